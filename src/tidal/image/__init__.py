"""Block image format: ZFile, extent indexes, layers, merged view, writable layer, manifests.

Pure: parses and produces bytes; every read goes through a random-access source
(``read_at(offset, length) -> bytes``) so layer bytes can come from a file, a registry or a peer.
"""
