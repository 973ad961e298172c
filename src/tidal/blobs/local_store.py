"""The embedded default blob store: a directory ``ROOT/blobs/sha256/<hex>``.

The same layout as an OCI image layout and a Tidal image directory, so an image directory is a
blob store and blobs can be hard-linked between them. Writes go to a temporary file in the same
directory, are hashed while they stream, fsynced and renamed into place only if the digest is
right: a crash or a bad download never leaves a partial or wrong blob under a digest name.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from tidal.blobs.source import STREAM_BLOCK_BYTES, ReadableStream, check_blob_range, verify_digest
from tidal.errors import BlobError, BlobIntegrityError, BlobNotFoundError
from tidal.fsutil import write_by_digest
from tidal.ids import Digest, parse_digest, short_digest

TMP_PREFIX = ".tmp-"


class LocalBlobStore:
    """Blobs as files under ``root/blobs/sha256``; thread- and process-safe."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._dir = self.root / "blobs" / "sha256"
        self._lock = threading.Lock()
        self.reads = 0
        self.bytes_read = 0

    @property
    def name(self) -> str:
        return f"local store {self.root}"

    @property
    def supports_ranges(self) -> bool:
        return True

    @property
    def is_remote(self) -> bool:
        return False

    def path(self, digest: Digest) -> Path:
        """Where blob ``digest`` lives (whether or not it exists)."""
        return self._dir / parse_digest(digest).split(":", 1)[1]

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise self._missing(digest) from None

    def _missing(self, digest: Digest) -> BlobNotFoundError:
        return BlobNotFoundError(f"blob {short_digest(digest)} is not in {self.name}")

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing(digest) from None
        except OSError as exc:
            raise BlobError(
                f"cannot open blob {short_digest(digest)} in {self.name}: {exc.strerror}"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            check_blob_range(self.name, digest, size, start, end)
            parts = []
            pos = start
            while pos < end:  # pread may return short reads on huge ranges
                part = os.pread(fd, end - pos, pos)
                if not part:
                    raise BlobIntegrityError(
                        f"blob {short_digest(digest)} in {self.name} shrank while being read"
                    )
                parts.append(part)
                pos += len(part)
        except OSError as exc:  # e.g. EIO from a failing disk
            raise BlobError(
                f"reading [{start}, {end}) of blob {short_digest(digest)} in {self.name} "
                f"failed: {exc.strerror}"
            ) from exc
        finally:
            os.close(fd)
        data = b"".join(parts)
        with self._lock:
            self.reads += 1
            self.bytes_read += len(data)
        if start == 0 and end == size:
            verify_digest(self.name, digest, data)
        return data

    def put(self, stream: ReadableStream, expected_digest: Digest | None = None) -> Digest:
        if expected_digest is not None and self.has(expected_digest):
            _drain(stream)  # content-addressed: same digest, same bytes
            return expected_digest
        self._dir.mkdir(parents=True, exist_ok=True)

        def refuse_other(digest: Digest) -> None:
            if expected_digest is not None and digest != expected_digest:
                raise BlobIntegrityError(
                    f"refusing to store blob {short_digest(expected_digest)} in {self.name}: "
                    f"the bytes received have digest {short_digest(digest)}"
                )

        with write_by_digest(
            self._dir, self.path, prefix=TMP_PREFIX, check=refuse_other, mode=0o644
        ) as out:
            while block := stream.read(STREAM_BLOCK_BYTES):
                out.write(block)
        return out.digest

    def put_bytes(self, data: bytes, expected_digest: Digest | None = None) -> Digest:
        return self.put(io.BytesIO(data), expected_digest)

    def delete(self, digest: Digest) -> bool:
        """Remove a blob; returns whether it existed."""
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def digests(self) -> list[Digest]:
        """Every blob in the store (temporary files of writes in progress excluded)."""
        if not self._dir.is_dir():
            return []
        return sorted(
            Digest("sha256:" + p.name) for p in self._dir.iterdir() if not p.name.startswith(".")
        )


def _drain(stream: ReadableStream) -> None:
    while stream.read(STREAM_BLOCK_BYTES):
        pass
