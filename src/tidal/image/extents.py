"""Extent indexes: which 512-byte sectors a layer changes, and where their data lives.

An index is a sorted list of non-overlapping extents. Lookup of a sector range is a binary
search for the first extent that could overlap it plus a walk to the right; the result covers
the range completely, with holes (``extent is None``) where this layer changes nothing.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tidal.errors import FormatError, LayerError

INDEX_MAGIC = b"TIDALIX\0"
INDEX_VERSION = 1
_HEAD = struct.Struct("<8sHHIQ")  # magic, version, reserved, crc32 of records, count
RECORD = struct.Struct("<QQI")  # lba_sectors, data_offset_sectors | ZERO_BIT, length_sectors
ZERO_BIT = 1 << 63
MAX_EXTENT_SECTORS = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Extent:
    """``length_sectors`` sectors starting at virtual sector ``lba_sectors``; data at
    ``data_offset_sectors`` sectors into the layer's data, or zeros (a discard) when ``zeroed``."""

    lba_sectors: int
    length_sectors: int
    data_offset_sectors: int = 0
    zeroed: bool = False

    @property
    def end_sector(self) -> int:
        return self.lba_sectors + self.length_sectors

    def slice(self, lba: int, end: int) -> Extent:
        """The part of this extent covering ``[lba, end)`` (must be inside it)."""
        shift = lba - self.lba_sectors
        return Extent(
            lba, end - lba, 0 if self.zeroed else self.data_offset_sectors + shift, self.zeroed
        )


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a looked-up range: covered by ``extent`` (already sliced), or a hole."""

    lba_sectors: int
    length_sectors: int
    extent: Extent | None


class ExtentMap:
    """Sorted, non-overlapping extents with insert-overrides semantics (newer write wins)."""

    def __init__(self, extents: Iterable[Extent] = ()) -> None:
        self._starts: list[int] = []
        self._items: list[Extent] = []
        prev_end = -1
        for e in extents:
            if e.length_sectors <= 0 or e.lba_sectors < 0:
                raise LayerError(
                    f"invalid extent {e}: length must be positive and lba non-negative"
                )
            if e.lba_sectors < prev_end:
                raise LayerError(f"extents overlap or are unsorted at lba {e.lba_sectors}")
            self._starts.append(e.lba_sectors)
            self._items.append(e)
            prev_end = e.end_sector

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._items)

    @property
    def end_sector(self) -> int:
        return self._items[-1].end_sector if self._items else 0

    def _first_overlapping(self, lba: int) -> int:
        i = bisect.bisect_right(self._starts, lba) - 1
        if i >= 0 and self._items[i].end_sector > lba:
            return i
        return i + 1

    def lookup(self, lba: int, count: int) -> list[Segment]:
        """Cover ``[lba, lba+count)`` with segments in order; holes have ``extent=None``."""
        out: list[Segment] = []
        end = lba + count
        pos = lba
        i = self._first_overlapping(lba)
        items = self._items
        while pos < end and i < len(items):
            e = items[i]
            if e.lba_sectors >= end:
                break
            if e.lba_sectors > pos:
                out.append(Segment(pos, e.lba_sectors - pos, None))
                pos = e.lba_sectors
            seg_end = min(e.end_sector, end)
            out.append(Segment(pos, seg_end - pos, e.slice(pos, seg_end)))
            pos = seg_end
            i += 1
        if pos < end:
            out.append(Segment(pos, end - pos, None))
        return out

    def insert(self, new: Extent) -> None:
        """Add ``new``; whatever it overlaps is cut away (the newest write wins)."""
        if new.length_sectors <= 0:
            return
        lo = self._first_overlapping(new.lba_sectors)
        hi = lo
        keep: list[Extent] = []
        while hi < len(self._items) and self._items[hi].lba_sectors < new.end_sector:
            old = self._items[hi]
            if old.lba_sectors < new.lba_sectors:
                keep.append(old.slice(old.lba_sectors, new.lba_sectors))
            if old.end_sector > new.end_sector:
                keep.append(old.slice(new.end_sector, old.end_sector))
            hi += 1
        left = [k for k in keep if k.lba_sectors < new.lba_sectors]
        right = [k for k in keep if k.lba_sectors >= new.end_sector]
        repl = [*left, new, *right]
        self._items[lo:hi] = repl
        self._starts[lo:hi] = [e.lba_sectors for e in repl]

    def compacted(self) -> ExtentMap:
        """Merge neighbours that continue each other (adjacent lba and adjacent data)."""
        out: list[Extent] = []
        for e in self._items:
            if out:
                p = out[-1]
                contiguous = p.end_sector == e.lba_sectors and p.zeroed == e.zeroed
                continues = (
                    e.zeroed or p.data_offset_sectors + p.length_sectors == e.data_offset_sectors
                )
                if (
                    contiguous
                    and continues
                    and p.length_sectors + e.length_sectors <= MAX_EXTENT_SECTORS
                ):
                    out[-1] = Extent(
                        p.lba_sectors,
                        p.length_sectors + e.length_sectors,
                        p.data_offset_sectors,
                        p.zeroed,
                    )
                    continue
            out.append(e)
        return ExtentMap(out)

    @staticmethod
    def serialized_size(count: int) -> int:
        """Bytes :meth:`serialize` writes for ``count`` extents (a reader can know a layer's
        index size from its manifest record before fetching it)."""
        return _HEAD.size + count * RECORD.size

    def serialize(self) -> bytes:
        records = b"".join(
            RECORD.pack(
                e.lba_sectors,
                (ZERO_BIT if e.zeroed else 0) | e.data_offset_sectors,
                e.length_sectors,
            )
            for e in self._items
        )
        head = _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, 0, zlib.crc32(records), len(self._items))
        return head + records

    @classmethod
    def deserialize(cls, data: bytes, name: str = "<index>") -> ExtentMap:
        if len(data) < _HEAD.size:
            raise FormatError(f"{name}: extent index is {len(data)} bytes, too short (truncated?)")
        magic, version, _r, crc, count = _HEAD.unpack_from(data)
        if magic != INDEX_MAGIC:
            raise FormatError(f"{name}: not an extent index (bad magic {magic!r})")
        if version != INDEX_VERSION:
            raise FormatError(f"{name}: extent index version {version} is not supported")
        records = data[_HEAD.size :]
        if len(records) != count * RECORD.size:
            raise FormatError(
                f"{name}: extent index says {count} records but holds {len(records)} bytes"
            )
        if zlib.crc32(records) != crc:
            raise FormatError(f"{name}: extent index failed its checksum")
        extents = []
        for lba, off, length in RECORD.iter_unpack(records):
            zeroed = bool(off & ZERO_BIT)
            extents.append(Extent(lba, length, off & ~ZERO_BIT, zeroed))
        try:
            return cls(extents)
        except LayerError as exc:
            raise FormatError(f"{name}: {exc}") from exc
