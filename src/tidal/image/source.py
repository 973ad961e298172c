"""Random-access byte sources: how the read-only formats (ZFile, layers) read their bytes.

A ZFile or a layer is opened from a :class:`RandomAccessSource`; whether the bytes come from a
local file, a registry (HTTP Range) or a peer is the source's business, not the format's.
(The writable layer reads and writes its own local ``data``/``index`` files directly.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from tidal.errors import FormatError, ImageNotFoundError


@runtime_checkable
class RandomAccessSource(Protocol):
    """Bytes addressable by offset. ``read_at`` returns exactly ``length`` bytes or raises."""

    @property
    def name(self) -> str:
        """What to call this source in error messages (a path or a digest)."""
        ...

    @property
    def size_bytes(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...


def check_range(source_name: str, size_bytes: int, offset: int, length: int) -> None:
    """Raise :class:`FormatError` if ``[offset, offset+length)`` is not inside the source."""
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise FormatError(
            f"{source_name}: read of {length} bytes at offset {offset} is outside the "
            f"{size_bytes}-byte blob (truncated or corrupt?)"
        )


class BytesSource:
    """An in-memory source; used by tests and for small blobs."""

    def __init__(self, data: bytes, name: str = "<memory>") -> None:
        self._data = bytes(data)
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def size_bytes(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(self._name, len(self._data), offset, length)
        return self._data[offset : offset + length]


class FileSource:
    """A local file read with ``pread`` (thread-safe, no shared file position).

    Counts reads and bytes so tests and stats can assert read amplification.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageNotFoundError(f"blob file {self._path} does not exist") from None
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self.reads = 0
        self.bytes_read = 0

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def size_bytes(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(self.name, self._size, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(
                f"{self.name}: short read of {len(data)}/{length} bytes at offset {offset}"
            )
        with self._lock:
            self.reads += 1
            self.bytes_read += length
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close must not leak descriptors
        with contextlib.suppress(OSError, AttributeError):
            self.close()
