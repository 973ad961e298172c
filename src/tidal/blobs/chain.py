"""Composing sources: the read path is cache -> peers -> registry.

:class:`FallbackBlobSource` asks its sources in order and moves on when one does not have the
blob (``BlobNotFoundError``) or cannot be reached (a ``RetryableError``, e.g. a peer that went
away). Put a :class:`~tidal.blobs.cached_source.CachedRangeSource` on top and the node's chunk
cache answers first::

    registry = RegistryBlobStore(RegistryClient("reg:5000"), "team/app")
    chain = FallbackBlobSource([peer_for_layer, registry])        # P2P slots in here
    layer_source = CachedRangeSource(chain, digest, size, cache=node_cache, check=...)

A peer is any BlobSource (its own chunk cache served over HTTP, a parent in a per-layer tree),
so P2P needs no change to the cache or the format.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from tidal.blobs.source import BlobSource
from tidal.errors import (
    BlobError,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobUnavailableError,
    ConfigError,
    RegistryUnavailableError,
    RetryableError,
)
from tidal.ids import Digest, short_digest

log = logging.getLogger("tidal.blobs.chain")


class FallbackBlobSource:
    """The first source that has the blob and answers serves the read. Thread-safe."""

    def __init__(self, sources: Sequence[BlobSource], name: str | None = None) -> None:
        if not sources:
            raise ConfigError("a source chain needs at least one blob source")
        self.sources = tuple(sources)
        self._name = name or " -> ".join(s.name for s in self.sources)
        self._lock = threading.Lock()
        self.served_by: dict[str, int] = {s.name: 0 for s in self.sources}
        """Reads answered per source: how much the peers saved the registry."""
        self.bytes_by: dict[str, int] = {s.name: 0 for s in self.sources}
        self.fallbacks = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def supports_ranges(self) -> bool:
        return all(s.supports_ranges for s in self.sources)

    @property
    def is_remote(self) -> bool:
        return any(s.is_remote for s in self.sources)

    def has(self, digest: Digest) -> bool:
        for s in self.sources:
            try:
                if s.has(digest):
                    return True
            except RetryableError as exc:
                log.info("%s unavailable for %s: %s", s.name, short_digest(digest), exc)
        return False

    def size(self, digest: Digest) -> int:
        errors: list[BlobError] = []
        for s in self.sources:
            try:
                return s.size(digest)
            except (BlobNotFoundError, BlobUnavailableError, RegistryUnavailableError) as exc:
                errors.append(exc)
        raise self._failure(digest, errors)

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        errors: list[BlobError] = []
        for i, s in enumerate(self.sources):
            try:
                data = s.read(digest, start, end)
            except (BlobNotFoundError, BlobUnavailableError, RegistryUnavailableError) as exc:
                errors.append(exc)
                continue
            with self._lock:
                self.served_by[s.name] += 1
                self.bytes_by[s.name] += len(data)
                self.fallbacks += i
            return data
        raise self._failure(digest, errors)

    def read_verified(
        self, digest: Digest, start: int, end: int, check: Callable[[bytes], bool]
    ) -> bytes:
        """Like ``read``, but a source whose bytes fail ``check`` is skipped like a missing one.

        A peer that serves corrupt chunks then costs one extra request, and the registry
        behind it answers; without this, a bad peer would fail every read it is asked for.
        """
        errors: list[BlobError] = []
        for i, s in enumerate(self.sources):
            try:
                data = s.read(digest, start, end)
            except (BlobNotFoundError, BlobUnavailableError, RegistryUnavailableError) as exc:
                errors.append(exc)
                continue
            if not check(data):
                log.warning(
                    "%s served bytes [%d, %d) of %s that fail their checksum; trying the next source",
                    s.name,
                    start,
                    end,
                    short_digest(digest),
                )
                errors.append(BlobIntegrityError(f"{s.name}: [{start}, {end}) failed its checksum"))
                continue
            with self._lock:
                self.served_by[s.name] += 1
                self.bytes_by[s.name] += len(data)
                self.fallbacks += i
            return data
        if any(isinstance(e, BlobIntegrityError) for e in errors):
            raise BlobIntegrityError(
                f"no source served good bytes [{start}, {end}) of blob {short_digest(digest)}: "
                + "; ".join(str(e) for e in errors)
            )
        raise self._failure(digest, errors)

    def _failure(self, digest: Digest, errors: list[BlobError]) -> BlobError:
        text = f"no source could serve blob {short_digest(digest)}: " + "; ".join(
            str(e) for e in errors
        )
        if all(isinstance(e, BlobNotFoundError) for e in errors):
            return BlobNotFoundError(text)
        return BlobUnavailableError(text + "; retry when the registry is reachable")
