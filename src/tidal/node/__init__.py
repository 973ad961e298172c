"""The node service's parts below the engine: the image store by reference (``images``).

ARCHITECTURE.md puts the image store, the one process for all mounts, the chunk cache and the
P2P peer in one node service; this package starts with the store. It uses ``tidal.blobs``,
``tidal.blockdev`` and ``tidal.image`` and knows nothing of containers.
"""
