"""An in-memory blob store: the deterministic fake behind pure tests of caches and chains.

It counts every read and the bytes it served, can pretend to be remote, and can be told to
fail (``fail_reads``) or to serve corrupted bytes (``corrupt``) so that tests can watch how the
layers above react.
"""

from __future__ import annotations

import threading

from tidal.blobs.source import ByteRange, ReadableStream, check_blob_range, verify_digest
from tidal.errors import BlobError, BlobIntegrityError, BlobNotFoundError
from tidal.ids import Digest, sha256_digest, short_digest


class MemoryBlobStore:
    """Blobs in a dict; thread-safe; every read recorded in ``read_log``."""

    def __init__(self, name: str = "memory", *, remote: bool = True) -> None:
        self._name = name
        self._remote = remote
        self._blobs: dict[Digest, bytes] = {}
        self._lock = threading.Lock()
        self.read_log: list[tuple[Digest, ByteRange]] = []
        self.bytes_read = 0
        self.fail_reads = 0
        """Number of upcoming reads that raise ``fail_with`` (a test's fault injection)."""
        self.fail_with: type[BlobError] = BlobError
        self.corrupt: set[Digest] = set()
        """Blobs whose reads come back with their first byte flipped."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def supports_ranges(self) -> bool:
        return True

    @property
    def is_remote(self) -> bool:
        return self._remote

    @property
    def reads(self) -> int:
        return len(self.read_log)

    def has(self, digest: Digest) -> bool:
        return digest in self._blobs

    def size(self, digest: Digest) -> int:
        return len(self._get(digest))

    def _get(self, digest: Digest) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobNotFoundError(f"blob {short_digest(digest)} is not in {self._name}") from None

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        data = self._get(digest)
        check_blob_range(self._name, digest, len(data), start, end)
        with self._lock:
            if self.fail_reads > 0:
                self.fail_reads -= 1
                raise self.fail_with(
                    f"{self._name}: injected failure reading {short_digest(digest)}"
                )
            self.read_log.append((digest, ByteRange(start, end)))
            self.bytes_read += end - start
        out = data[start:end]
        if digest in self.corrupt and out:
            out = bytes([out[0] ^ 0xFF]) + out[1:]
        if start == 0 and end == len(data):
            verify_digest(self._name, digest, out)
        return out

    def put(self, stream: ReadableStream, expected_digest: Digest | None = None) -> Digest:
        return self.put_bytes(stream.read(), expected_digest)

    def put_bytes(self, data: bytes, expected_digest: Digest | None = None) -> Digest:
        digest = sha256_digest(data)
        if expected_digest is not None and digest != expected_digest:
            raise BlobIntegrityError(
                f"refusing to store blob {short_digest(expected_digest)} in {self._name}: "
                f"the bytes have digest {short_digest(digest)}"
            )
        with self._lock:
            self._blobs[digest] = bytes(data)
        return digest
