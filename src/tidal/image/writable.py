"""The writable layer: append-only data and index files on top of a read-only stack.

Why append-only: a write appends its sectors to ``data`` and then one checksummed record to
``index``. A crash can leave at most a torn last record (dropped on open, with a warning) or
data with no record (ignored); nothing already acknowledged is ever rewritten, so it cannot be
corrupted. ``flush`` fsyncs data before index, so a record never survives a power loss without
its data. Overwrites append again; the dead space is reclaimed by :meth:`WritableLayer.commit`,
which packs only the live sectors into a new read-only layer (compacted index, ZFile data).

Directory layout: ``meta.json`` (device size, format version), ``data``, ``index``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tidal.errors import FormatError, ImageNotFoundError, LayerError
from tidal.fsutil import write_json_atomic
from tidal.image.extents import RECORD, ZERO_BIT, Extent, ExtentMap
from tidal.image.layer import Layer
from tidal.image.merged import check_device_range, read_sectors
from tidal.image.zfile import DEFAULT_CHUNK_SIZE_BYTES, Codec, ZFileInfo, ZFileWriter
from tidal.units import SECTOR_BYTES

log = logging.getLogger(__name__)

WRITABLE_VERSION = 1
_LOG_RECORD = struct.Struct(
    "<QQII"
)  # lba, data_offset|ZERO_BIT, length, crc32 of the first 20 bytes
MAX_WRITE_SECTORS = 1 << 16  # split huge writes so each record stays small and bounded


@dataclass(frozen=True)
class CommitInfo:
    """What :meth:`WritableLayer.commit` wrote."""

    zfile: ZFileInfo
    extent_count: int
    data_sectors: int
    zeroed_sectors: int


class WritableLayer:
    """A read-write layer; reads fall through to ``lower`` (a read-only stack) where it has no data.

    Implements the ``BlockDevice`` protocol. Thread-safe.
    """

    readonly = False

    def __init__(self, path: Path, size_bytes: int, lower: Sequence[Layer] = ()) -> None:
        self.path = path
        self._size = size_bytes
        self.lower = list(lower)
        self.index = ExtentMap()
        self._lock = threading.RLock()
        self._data_fd = os.open(path / "data", os.O_RDWR | os.O_CLOEXEC)
        self._index_fd = os.open(path / "index", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._replay()
        self._data_end = os.fstat(self._data_fd).st_size
        self.bytes_written = 0

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], size_bytes: int, lower: Sequence[Layer] = ()
    ) -> WritableLayer:
        """Make an empty writable layer for a device of ``size_bytes`` in directory ``path``."""
        p = Path(path)
        if size_bytes <= 0 or size_bytes % SECTOR_BYTES:
            raise LayerError(
                f"device size {size_bytes} must be a positive multiple of {SECTOR_BYTES}"
            )
        p.mkdir(parents=True, exist_ok=True)
        if (p / "meta.json").exists():
            raise LayerError(
                f"{p} already holds a writable layer; open it instead or choose an empty directory"
            )
        for name in ("data", "index"):
            (p / name).touch()
        doc = {"version": WRITABLE_VERSION, "size_bytes": size_bytes}
        write_json_atomic(p / "meta.json", doc, indent=None)
        return cls(p, size_bytes, lower)

    @classmethod
    def open(cls, path: str | os.PathLike[str], lower: Sequence[Layer] = ()) -> WritableLayer:
        p = Path(path)
        try:
            meta = json.loads((p / "meta.json").read_text())
        except FileNotFoundError:
            raise ImageNotFoundError(f"no writable layer in {p} (meta.json missing)") from None
        except json.JSONDecodeError as exc:
            raise FormatError(f"{p / 'meta.json'} is not valid JSON: {exc}") from exc
        if meta.get("version") != WRITABLE_VERSION:
            raise FormatError(f"{p}: writable layer version {meta.get('version')} is not supported")
        return cls(p, int(meta["size_bytes"]), lower)

    def _replay(self) -> None:
        """Rebuild the in-memory index from the log; drop a torn or dangling tail."""
        raw = os.pread(self._index_fd, os.fstat(self._index_fd).st_size, 0)
        data_size = os.fstat(self._data_fd).st_size
        good = 0
        n = _LOG_RECORD.size
        while good + n <= len(raw):
            lba, off, length, crc = _LOG_RECORD.unpack_from(raw, good)
            if zlib.crc32(raw[good : good + RECORD.size]) != crc:
                break
            zeroed = bool(off & ZERO_BIT)
            off &= ~ZERO_BIT
            if not zeroed and (off + length) * SECTOR_BYTES > data_size:
                break  # data never reached the disk
            self.index.insert(Extent(lba, length, off, zeroed))
            good += n
        if good != len(raw):
            log.warning(
                "writable layer %s: dropping %d bytes of torn index tail (a write in flight at a crash)",
                self.path,
                len(raw) - good,
            )
            os.ftruncate(self._index_fd, good)

    # --- BlockDevice ------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._size

    def read_data(self, offset: int, length: int) -> bytes:
        data = os.pread(self._data_fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path / 'data'}: short read at offset {offset}")
        return data

    def read(self, offset: int, length: int) -> bytes:
        check_device_range(self._size, offset, length)
        if length == 0:
            return b""
        lba = offset // SECTOR_BYTES
        end = -(-(offset + length) // SECTOR_BYTES)
        with self._lock:
            buf = read_sectors([*self.lower, self], lba, end - lba)
        skip = offset - lba * SECTOR_BYTES
        return bytes(buf[skip : skip + length])

    def write(self, offset: int, data: bytes) -> None:
        """Write any byte range; partial edge sectors are read-modify-written."""
        check_device_range(self._size, offset, len(data))
        if not data:
            return
        with self._lock:
            lba = offset // SECTOR_BYTES
            end = -(-(offset + len(data)) // SECTOR_BYTES)
            skip = offset - lba * SECTOR_BYTES
            if skip or (offset + len(data)) % SECTOR_BYTES:
                buf = bytearray()
                # only the edge sectors need the old contents
                head = read_sectors([*self.lower, self], lba, 1)
                tail = read_sectors([*self.lower, self], end - 1, 1) if end - 1 > lba else None
                buf = bytearray((end - lba) * SECTOR_BYTES)
                buf[:SECTOR_BYTES] = head
                if tail is not None:
                    buf[-SECTOR_BYTES:] = tail
                buf[skip : skip + len(data)] = data
                payload: bytes | bytearray = buf
            else:
                payload = data
            self._write_sectors(lba, payload)

    def _write_sectors(self, lba: int, payload: bytes | bytearray) -> None:
        view = memoryview(payload)
        step = MAX_WRITE_SECTORS * SECTOR_BYTES
        for start in range(0, len(view), step):
            part = view[start : start + step]
            part_lba = lba + start // SECTOR_BYTES
            sectors = len(part) // SECTOR_BYTES
            if part.nbytes and bytes(part).count(0) == part.nbytes:
                self._append_record(part_lba, 0, sectors, zeroed=True)
                continue
            pos = self._data_end
            written = os.pwrite(self._data_fd, part, pos)
            if written != len(part):
                raise LayerError(
                    f"{self.path / 'data'}: short write ({written}/{len(part)} bytes); disk full?"
                )
            self._data_end += len(part)
            self.bytes_written += len(part)
            self._append_record(part_lba, pos // SECTOR_BYTES, sectors, zeroed=False)

    def _append_record(self, lba: int, off: int, length: int, *, zeroed: bool) -> None:
        word = off | (ZERO_BIT if zeroed else 0)
        rec = RECORD.pack(lba, word, length)
        os.write(self._index_fd, rec + struct.pack("<I", zlib.crc32(rec)))
        self.index.insert(Extent(lba, length, off, zeroed))

    def discard(self, offset: int, length: int) -> None:
        """Zero the whole sectors inside ``[offset, offset+length)`` (a TRIM)."""
        check_device_range(self._size, offset, length)
        lba = -(-offset // SECTOR_BYTES)
        end = (offset + length) // SECTOR_BYTES
        if end > lba:
            with self._lock:
                for start in range(lba, end, MAX_WRITE_SECTORS):
                    self._append_record(start, 0, min(MAX_WRITE_SECTORS, end - start), zeroed=True)

    def flush(self) -> None:
        """Make every acknowledged write durable: data first, then the index that points to it."""
        with self._lock:
            os.fsync(self._data_fd)
            os.fsync(self._index_fd)

    # --- commit -----------------------------------------------------------------------------

    def commit(
        self,
        out: BinaryIO,
        *,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        codec: Codec | str = Codec.LZ4,
        level: int | None = None,
    ) -> CommitInfo:
        """Write this layer's live sectors as a read-only layer blob to ``out``.

        The new index is compacted: neighbouring extents merge, overwritten data is gone.
        """
        with self._lock:
            live = self.index.compacted()
            packed: list[Extent] = []
            cursor = 0
            zeroed = 0
            for e in live:
                if e.zeroed:
                    packed.append(e)
                    zeroed += e.length_sectors
                else:
                    packed.append(Extent(e.lba_sectors, e.length_sectors, cursor, False))
                    cursor += e.length_sectors
            new_index = ExtentMap(packed).compacted()
            writer = ZFileWriter(
                out,
                chunk_size_bytes=chunk_size_bytes,
                codec=codec,
                level=level,
                metadata=new_index.serialize(),
            )
            step = 1 << 20
            for e in live:
                if e.zeroed:
                    continue
                pos, remaining = (
                    e.data_offset_sectors * SECTOR_BYTES,
                    e.length_sectors * SECTOR_BYTES,
                )
                while remaining:
                    n = min(step, remaining)
                    writer.write(self.read_data(pos, n))
                    pos += n
                    remaining -= n
            info = writer.close()
        return CommitInfo(
            zfile=info, extent_count=len(new_index), data_sectors=cursor, zeroed_sectors=zeroed
        )

    def close(self) -> None:
        with self._lock:
            for fd in (self._data_fd, self._index_fd):
                if fd >= 0:
                    os.close(fd)
            self._data_fd = self._index_fd = -1

    def __enter__(self) -> WritableLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
