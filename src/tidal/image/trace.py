"""Access traces: which block ranges an application reads while it starts.

A trace records offsets and lengths only, never data, in the order of first access. It is
stored with the image as a hidden trace layer; on the next cold start the prefetcher replays
it with high concurrency so the blocks are local before the application asks for them.

Blob layout (little-endian): magic "TIDALTR\\0", version u16, reserved u16, crc32 of records
u32, count u64, then per range: lba_sectors u64, length_sectors u32, first_access_ms u32.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tidal.errors import FormatError
from tidal.image.device import BlockDevice
from tidal.units import SECTOR_BYTES

TRACE_MAGIC = b"TIDALTR\0"
TRACE_VERSION = 1
TRACE_MEDIA_TYPE = "application/vnd.tidal.image.trace.v1"
_HEAD = struct.Struct("<8sHHIQ")
_REC = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class TraceRange:
    lba_sectors: int
    length_sectors: int
    first_access_ms: int = 0

    @property
    def offset_bytes(self) -> int:
        return self.lba_sectors * SECTOR_BYTES

    @property
    def length_bytes(self) -> int:
        return self.length_sectors * SECTOR_BYTES


@dataclass(frozen=True)
class Trace:
    """Ranges in order of first access."""

    ranges: tuple[TraceRange, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.length_bytes for r in self.ranges)

    def serialize(self) -> bytes:
        recs = b"".join(
            _REC.pack(r.lba_sectors, r.length_sectors, r.first_access_ms) for r in self.ranges
        )
        return _HEAD.pack(TRACE_MAGIC, TRACE_VERSION, 0, zlib.crc32(recs), len(self.ranges)) + recs

    @classmethod
    def deserialize(cls, data: bytes, name: str = "<trace>") -> Trace:
        if len(data) < _HEAD.size:
            raise FormatError(f"{name}: trace is {len(data)} bytes, too short (truncated?)")
        magic, version, _r, crc, count = _HEAD.unpack_from(data)
        if magic != TRACE_MAGIC:
            raise FormatError(f"{name}: not a Tidal trace (bad magic {magic!r})")
        if version != TRACE_VERSION:
            raise FormatError(f"{name}: trace version {version} is not supported")
        recs = data[_HEAD.size :]
        if len(recs) != count * _REC.size:
            raise FormatError(f"{name}: trace says {count} ranges but holds {len(recs)} bytes")
        if zlib.crc32(recs) != crc:
            raise FormatError(f"{name}: trace failed its checksum")
        return cls(tuple(TraceRange(*t) for t in _REC.iter_unpack(recs)))


def coalesce(ranges: Iterable[TraceRange], gap_sectors: int = 0) -> list[TraceRange]:
    """Sort and merge ranges that overlap or lie within ``gap_sectors`` of each other.

    Keeps the earliest first-access time of the merged pieces, so a prefetcher can still
    order by urgency.
    """
    out: list[TraceRange] = []
    for r in sorted(ranges, key=lambda r: r.lba_sectors):
        if out and r.lba_sectors <= out[-1].lba_sectors + out[-1].length_sectors + gap_sectors:
            p = out[-1]
            end = max(p.lba_sectors + p.length_sectors, r.lba_sectors + r.length_sectors)
            out[-1] = TraceRange(
                p.lba_sectors, end - p.lba_sectors, min(p.first_access_ms, r.first_access_ms)
            )
        else:
            out.append(r)
    return out


class TraceRecorder:
    """Wraps a block device and records every read's sector range (first access wins)."""

    def __init__(self, device: BlockDevice, clock: Callable[[], float] | None = None) -> None:
        self.device = device
        self._clock = clock or time.monotonic
        self._t0 = self._clock()
        self._lock = threading.Lock()
        self._ranges: list[TraceRange] = []
        self._seen: set[int] = set()  # 4 KiB pages already recorded, to keep the trace small

    @property
    def size_bytes(self) -> int:
        return self.device.size_bytes

    @property
    def readonly(self) -> bool:
        return self.device.readonly

    def read(self, offset: int, length: int) -> bytes:
        data = self.device.read(offset, length)
        if length:
            lba = offset // SECTOR_BYTES
            end = -(-(offset + length) // SECTOR_BYTES)
            pages = range(lba // 8, -(-end // 8))
            with self._lock:
                if any(p not in self._seen for p in pages):
                    self._seen.update(pages)
                    ms = int((self._clock() - self._t0) * 1000)
                    self._ranges.append(TraceRange(lba, end - lba, min(ms, 0xFFFF_FFFF)))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.device.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self.device.discard(offset, length)

    def flush(self) -> None:
        self.device.flush()

    def trace(self) -> Trace:
        with self._lock:
            return Trace(tuple(self._ranges))
