"""Settings of the blob layer: ``[blobs]`` in the TOML file, ``TIDAL_BLOBS__<KEY>`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tidal.blobs.chunk_cache import ChunkCache
from tidal.config import data_root, load_section
from tidal.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check,
)

DEFAULT_CACHE_CAPACITY_BYTES = 10 * 1024**3
"""10 GiB: holds the working set of many images (a container reads ~6 % of its image)."""
DEFAULT_CACHE_MEMORY_BYTES = 256 * 1024**2
"""Recent chunks kept in each process's memory as well (one tier per cache root): what a trace
replay just fetched is served to the mount without a file read per chunk."""
DEFAULT_CACHE_WRITE_BEHIND_BYTES = 128 * 1024**2
"""New entries that may wait for the cache writer: more than a start-up trace's replay (the
imports app's is 44 MB), so nothing is written while one runs."""
DEFAULT_FETCH_CONCURRENCY = 8
"""Requests in flight per blob: enough to fill a 1 Gbit/s link at ~1 ms RTT with 64 KiB chunks
coalesced into ~1 MiB requests, few enough not to overload a registry."""
DEFAULT_PREFETCH_CONCURRENCY = 16
"""Trace replay runs ahead of the container, so it may use more connections than demand reads."""
DEFAULT_PREFETCH_ORDER: Literal["need", "trace"] = "need"
"""Issue 16, bench_coalesce on bench_lazy_start's traces: python start-up 80 requests instead
of 152, pandas 247 instead of 834, the same bytes."""
DEFAULT_COALESCE_GAP_BYTES = 0
"""Only adjacent ranges are merged by default: fetching gap bytes is pure waste on a slow link."""
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Cap on one coalesced Range request, so one request never delays a demand read for long."""
DEFAULT_RETRY_ATTEMPTS = 5
DEFAULT_BACKOFF_INITIAL_S = 0.2
DEFAULT_BACKOFF_MAX_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_PROBE_INTERVAL_S = 2.0
DEFAULT_UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024
"""Blobs above this size are uploaded in PATCH chunks of this size (memory stays bounded)."""


@dataclass(frozen=True)
class BlobSettings:
    cache_dir: Path | None = None
    """Chunk cache directory; ``None`` means ``$TIDAL_DATA_ROOT/cache/chunks``."""
    cache_capacity_bytes: NonNegativeInt = DEFAULT_CACHE_CAPACITY_BYTES
    cache_memory_bytes: NonNegativeInt = DEFAULT_CACHE_MEMORY_BYTES
    """Of the chunk cache, how many bytes of recent entries a process also keeps in memory
    (0: none; the node service serves every mount from its one tier)."""
    cache_write_behind_bytes: NonNegativeInt = DEFAULT_CACHE_WRITE_BEHIND_BYTES
    """How many bytes of new entries may wait in memory for the process's cache writer, which
    writes them once puts pause (a trace replay ended) or this many wait (0: every put writes
    its entry before it returns). Entries still waiting when a process is SIGKILLed are lost
    (fetched again when next needed), never torn."""
    fetch_concurrency: PositiveInt = DEFAULT_FETCH_CONCURRENCY
    prefetch_concurrency: PositiveInt = DEFAULT_PREFETCH_CONCURRENCY
    prefetch_order: Literal["need", "trace"] = DEFAULT_PREFETCH_ORDER
    """How a trace replay groups its chunks into requests: ``need`` merges every run of
    neighbouring chunks and asks first for the request holding the earliest-needed one;
    ``trace`` merges only chunks that follow each other in the trace (2-3x the requests)."""
    coalesce_gap_bytes: NonNegativeInt = DEFAULT_COALESCE_GAP_BYTES
    max_request_bytes: PositiveInt = DEFAULT_MAX_REQUEST_BYTES
    retry_attempts: PositiveInt = DEFAULT_RETRY_ATTEMPTS
    backoff_initial_s: NonNegativeFloat = DEFAULT_BACKOFF_INITIAL_S
    backoff_max_s: NonNegativeFloat = DEFAULT_BACKOFF_MAX_S
    request_timeout_s: PositiveFloat = DEFAULT_REQUEST_TIMEOUT_S
    tail_in_one_request: bool = True
    """Open a lazy layer with one ranged request for its ZFile footer and tail (their size
    follows from the layer's manifest record) instead of two in a row: one round trip less
    per layer before a mount is ready. False: footer first, then the tail it points at."""
    require_digests: bool = False
    """Refuse lazy images whose layers carry no chunk digests (crc32 only, built by an older
    Tidal); False reads them with a warning."""
    probe_interval_s: PositiveFloat = DEFAULT_PROBE_INTERVAL_S
    """While a registry is down, requests fail at once except one probe this often."""
    upload_chunk_bytes: PositiveInt = DEFAULT_UPLOAD_CHUNK_BYTES
    insecure_registries: tuple[str, ...] = ()
    """Registries (host[:port]) spoken to over plain HTTP; loopback addresses always are."""
    ca_file: Path | None = None
    """Extra CA certificates (PEM) for registries with a private certificate authority."""
    default_registry: str | None = None
    """Registry (host[:port]) for references that name none; ``None``: the local store."""
    store_dir: Path | None = None
    """The embedded local store; ``None`` means ``$TIDAL_DATA_ROOT/store``."""
    p2p_roots: tuple[str, ...] = ()
    """P2P root nodes (``http://host:port``); empty: no P2P, layers come from the registry."""
    p2p_listen: str | None = None
    """Where a mount's peer server listens (``host:port``; port 0 picks a free one); None: the
    advertised address on a free port (the interface towards the roots, not every one)."""
    p2p_token_file: Path | None = None
    """The cluster token (``tidal p2p token > FILE; chmod 600 FILE``): roots and peers admit and
    trust only holders of it. Required when ``p2p_roots`` is set."""
    p2p_advertise: str | None = None
    """The address other nodes reach this one at; ``None``: the local address towards the
    first root."""
    auth_file: Path | None = None
    """Docker-style auth.json; ``None`` means ``$TIDAL_REGISTRY_AUTH`` or ``~/.config/tidal/auth.json``."""

    def __post_init__(self) -> None:
        check(self, "[blobs]")

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else data_root() / "cache" / "chunks"

    def chunk_cache(self) -> ChunkCache:
        """The node's chunk cache as these settings describe it."""
        return ChunkCache(
            self.resolved_cache_dir(),
            self.cache_capacity_bytes,
            memory_bytes=self.cache_memory_bytes,
            write_behind_bytes=self.cache_write_behind_bytes,
        )

    def resolved_store_dir(self) -> Path:
        return self.store_dir if self.store_dir is not None else data_root() / "store"


def load_blob_settings(path: Path | None = None, env: dict[str, str] | None = None) -> BlobSettings:
    return load_section("blobs", BlobSettings, path, env)
