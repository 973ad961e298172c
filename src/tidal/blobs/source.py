"""The blob interfaces: one ``BlobSource`` per place bytes can come from.

A blob is immutable content named by its sha256 digest. Every place that holds blobs — the
local directory store, an OCI registry, a peer's cache, an in-memory fake — answers the same
three questions (``has``, ``size``, ``read(digest, start, end)``), and says through capability
properties what it is good at, so that callers (the chunk cache, the chain, the CLI) can decide
without knowing the implementation. A :class:`BlobStore` can also take new blobs.

:class:`BlobRangeSource` turns "blob ``D`` in source ``S``" into the format layer's
``RandomAccessSource`` (``read_at``), uncached; :class:`tidal.blobs.cached_source.CachedRangeSource`
is the cached, batched variant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tidal.errors import BlobIntegrityError, BlobRangeError
from tidal.ids import Digest, short_digest
from tidal.image.source import check_range

STREAM_BLOCK_BYTES = 1024 * 1024
"""Copy granularity of streaming puts: memory stays bounded by one block whatever the blob size."""


class ReadableStream(Protocol):
    """What ``put`` reads from: any binary file object, an HTTP response stream, a generator."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, order=True)
class ByteRange:
    """``[start, end)`` of a blob; ``end`` is exclusive, like a Python slice."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise BlobRangeError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    @classmethod
    def of(cls, offset: int, length: int) -> ByteRange:
        return cls(offset, offset + length)


@runtime_checkable
class BlobSource(Protocol):
    """Read-only access to blobs by digest."""

    @property
    def name(self) -> str:
        """What to call this source in messages (a directory, a registry URL, a peer)."""
        ...

    @property
    def supports_ranges(self) -> bool:
        """Whether ``read`` of a small range costs about that range (not the whole blob)."""
        ...

    @property
    def is_remote(self) -> bool:
        """Whether a read crosses the network, i.e. whether caching it locally pays."""
        ...

    def has(self, digest: Digest) -> bool: ...

    def size(self, digest: Digest) -> int:
        """Size of the blob in bytes; :class:`BlobNotFoundError` if absent."""
        ...

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the blob: exactly ``end - start`` bytes, or an error.

        Reading the whole blob (``0, size``) verifies the digest.
        """
        ...


@runtime_checkable
class BlobStore(BlobSource, Protocol):
    """A blob source that also accepts new blobs."""

    def put(self, stream: ReadableStream, expected_digest: Digest | None = None) -> Digest:
        """Store the bytes read from ``stream`` until EOF; returns their digest.

        If ``expected_digest`` is given and the bytes do not match, nothing is stored and
        :class:`BlobIntegrityError` is raised.
        """
        ...

    def put_bytes(self, data: bytes, expected_digest: Digest | None = None) -> Digest: ...


def check_blob_range(source: str, digest: Digest, size: int, start: int, end: int) -> None:
    """Raise :class:`BlobRangeError` unless ``[start, end)`` lies inside a blob of ``size`` bytes."""
    if start < 0 or end < start or end > size:
        raise BlobRangeError(
            f"range [{start}, {end}) is outside blob {short_digest(digest)} "
            f"({size} bytes) in {source}"
        )


def verify_digest(source: str, digest: Digest, data: bytes) -> None:
    """Raise :class:`BlobIntegrityError` if ``data`` is not the blob named ``digest``."""
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise BlobIntegrityError(
            f"blob {short_digest(digest)} from {source} has digest {short_digest(actual)}; "
            "the copy is corrupt or the source serves the wrong content"
        )


def copy_blob(
    src: BlobSource, dst: BlobStore, digest: Digest, *, block_bytes: int = 16 * 1024 * 1024
) -> bool:
    """Copy one blob unless ``dst`` has it already; returns whether bytes moved.

    Streams in ``block_bytes`` ranges when the source supports ranges, so memory stays bounded;
    ``dst.put`` checks the digest of what arrived.
    """
    if dst.has(digest):
        return False
    size = src.size(digest)
    if not src.supports_ranges or size <= block_bytes:
        dst.put_bytes(src.read(digest, 0, size), expected_digest=digest)
        return True
    dst.put(_RangeStream(src, digest, size, block_bytes), expected_digest=digest)
    return True


class _RangeStream:
    """A read-only file object over a blob, pulled block by block with ranged reads."""

    def __init__(self, src: BlobSource, digest: Digest, size: int, block_bytes: int) -> None:
        self._src, self._digest, self._size, self._block = src, digest, size, block_bytes
        self._pos = 0
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        if not self._buf and self._pos < self._size:
            end = min(self._pos + self._block, self._size)
            self._buf = self._src.read(self._digest, self._pos, end)
            self._pos = end
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


class BlobRangeSource:
    """One blob of a :class:`BlobSource` as a ``RandomAccessSource`` (uncached, unbatched).

    For local stores this is all a reader needs; remote sources want
    :class:`tidal.blobs.cached_source.CachedRangeSource` on top.
    """

    def __init__(self, source: BlobSource, digest: Digest, size_bytes: int | None = None) -> None:
        self._source = source
        self._digest = digest
        self._size = source.size(digest) if size_bytes is None else size_bytes

    @property
    def name(self) -> str:
        return f"blob {short_digest(self._digest)} in {self._source.name}"

    @property
    def size_bytes(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(self.name, self._size, offset, length)  # FormatError, as the protocol says
        return self._source.read(self._digest, offset, offset + length)
