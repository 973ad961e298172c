"""Where bytes come from: local blob store, OCI registry client, chunk cache, P2P.

Module map (one interface, :class:`~tidal.blobs.source.BlobSource`, many implementations):

- ``source``          BlobSource / BlobStore protocols, ByteRange, BlobRangeSource, copy_blob
- ``local_store``     the embedded default: ``ROOT/blobs/sha256/<hex>``, atomic, digest-checked
- ``registry_client`` OCI distribution client and RegistryBlobStore (one repository)
- ``auth``            auth.json credentials, WWW-Authenticate challenges, token cache
- ``reference``       ``registry/repository:tag@digest`` parsing
- ``chunk_cache``     the node's persistent, bounded, crash-safe chunk cache
- ``cached_source``   CachedRangeSource (the lazy RandomAccessSource), coalescing, prefetch
- ``chain``           FallbackBlobSource: peers, then the registry
- ``distribution``    push/pull of Tidal images, LazyImage, OCI image fetch for convert

Test fakes and harnesses of this part live in :mod:`tidal.testing`: ``memory_store`` (the
in-memory fake: counts reads, injects faults), ``blob_conformance`` (the BlobStore contract as
a reusable check), ``fake_registry``, ``registry_server`` and ``network`` (the CNCF registry
process and a shaped link, for tests, demo and benchmarks).
"""
