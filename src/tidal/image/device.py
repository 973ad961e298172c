"""The block device protocol that ``tidal.blockdev`` serves through FUSE."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockDevice(Protocol):
    """A virtual disk of ``size_bytes``: byte-addressed reads and writes, any alignment."""

    @property
    def size_bytes(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...
