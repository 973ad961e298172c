"""Fakes, harnesses and conformance suites shipped with Tidal, as ``zarr.testing`` ships its
store suites: real classes over a temp dir or memory, so that tests of every part (and of code
built on Tidal) use the same fakes. Nothing here is imported by Tidal's own runtime code.
"""
