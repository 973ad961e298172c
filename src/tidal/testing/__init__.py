"""Fakes, harnesses and conformance suites shipped with Tidal, as ``zarr.testing`` ships its
store suites: real classes over a temp dir or memory, so that tests of every part (and of code
built on Tidal) use the same fakes.

- fakes: ``cgroups`` (cgroup v1/v2 trees under a directory), ``clock`` (``FakeClock``),
  ``qos`` (``FakeNodeProbe``), ``memory_store`` (``MemoryBlobStore``: counts reads, injects
  faults), ``fake_registry`` (an OCI registry behind ``httpx.MockTransport``)
- harnesses: ``registry_server`` (the CNCF registry on a loopback port; also used by
  ``tidal demo`` and the benchmarks), ``token_server`` (bearer tokens for it), ``network``
  (a tc-shaped link to a namespace, hosts on a bridge), ``oci_images`` / ``oci_builder``
  (OCI layouts and archives made on the spot), ``trees`` (compare two directory trees)
- conformance suites: ``blob_conformance`` (``check_blob_store``, the ``BlobStore`` contract)

Tidal's runtime never imports this package (an import-linter contract says so); only the
``tidal demo`` command, tests and benchmarks do.
"""
