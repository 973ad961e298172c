"""Pin what the kernel's ext4 writes that no layer tar says, so a converted layer is reproducible.

Converting the same OCI layer on the same parent must give the byte-identical block layer
(its digest is how registries and nodes share it). The builder applies a tar through the
kernel's ext4, which stamps values of its own into the blocks it writes:

- every inode it creates or changes gets ``ctime`` = now, a birth time (``crtime``) = now and
  a random ``i_generation``; a change bumps the inode's version counter;
- a deleted inode keeps its old fields plus ``dtime`` = now;
- the superblock records the mount and write times, a mount count, the kilobytes written
  since mkfs and the path it was last mounted on (the builder's work directory holds its pid).

:func:`pin_layer` rewrites exactly those fields in the blocks one layer wrote: ``atime``,
``ctime`` and ``crtime`` become the inode's ``mtime`` (which the tar set), generation and
version become 0, a freed inode is zeroed (as mkfs leaves an unused one), and the superblock's
mount record is reset. Everything else in those blocks follows from the tar and the parent.

Why by hand: no tool edits a filesystem held as a writable layer, and none can tell which
inodes one layer touched; the layer's own extents say that, and the fields sit at fixed offsets
(the kernel's Documentation/filesystems/ext4/). The builder formats without ``metadata_csum``
(see :func:`tidal.blockdev.builder.reproducible_format`): inode checksums, and the directory
and extent-block checksums seeded with an inode's generation, would otherwise have to be
recomputed. Layer blobs carry their own checksums (ZFile chunk crc32, the blob digest).
Pure: reads and writes go through the ``read``/``write`` of any block device.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from tidal.errors import BuildError

BUILD_TIME_S = 1
"""The builder's clock: mkfs's (root and superblock times) and the time of a directory that no
tar entry gives one. 1, not 0: e2fsprogs reads ``E2FSPROGS_FAKE_TIME=0`` as unset."""
BUILD_TIME_NS = BUILD_TIME_S * 10**9

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
RO_COMPAT_METADATA_CSUM = 0x400
BG_INODE_UNINIT = 0x1
GOOD_OLD_INODE_SIZE = 128

# superblock fields (offsets into the 1024-byte superblock)
_SB_MTIME, _SB_WTIME, _SB_MNT_COUNT = 0x2C, 0x30, 0x34
_SB_LAST_MOUNTED, _SB_LAST_MOUNTED_LEN = 0x88, 64
_SB_KBYTES_WRITTEN = 0x178
_SB_WTIME_HI, _SB_MTIME_HI = 0x274, 0x275

# inode fields
_I_ATIME, _I_CTIME, _I_MTIME = 0x08, 0x0C, 0x10
_I_VERSION_LO, _I_GENERATION = 0x24, 0x64
_I_EXTRA_ISIZE = 0x80
_I_CTIME_EXTRA, _I_MTIME_EXTRA, _I_ATIME_EXTRA = 0x84, 0x88, 0x8C
_I_CRTIME, _I_CRTIME_EXTRA, _I_VERSION_HI = 0x90, 0x94, 0x98


class BlockIO(Protocol):
    """What the pinning needs of a device (a :class:`~tidal.image.writable.WritableLayer`)."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Ext4Geometry:
    """Where an ext4 filesystem keeps its inodes (from the superblock and group descriptors)."""

    block_size_bytes: int
    inode_size_bytes: int
    inodes_per_group: int
    first_ino: int
    inode_tables: tuple[int, ...]
    """Block number of each group's inode table."""
    inode_bitmaps: tuple[int, ...]
    inode_uninit: tuple[bool, ...]
    """Groups whose inodes were never used (their bitmap block may be uninitialised)."""


@dataclass(frozen=True)
class PinStats:
    inodes_pinned: int
    inodes_zeroed: int


def read_geometry(dev: BlockIO) -> Ext4Geometry:
    sb = dev.read(SUPERBLOCK_OFFSET, 1024)
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    if magic != EXT4_MAGIC:
        raise BuildError(f"no ext4 superblock on the device (magic {magic:#06x}); nothing to pin")
    inodes_count, _, _, _, _, first_data_block, log_block = struct.unpack_from("<7I", sb, 0)
    (inodes_per_group,) = struct.unpack_from("<I", sb, 0x28)
    (rev,) = struct.unpack_from("<I", sb, 0x4C)
    first_ino, inode_size = struct.unpack_from("<IH", sb, 0x54) if rev else (11, 128)
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    if ro_compat & RO_COMPAT_METADATA_CSUM:
        raise BuildError(
            "the filesystem has metadata_csum; pinning its inodes would invalidate checksums "
            "seeded with their generation (format it with tidal's reproducible format)"
        )
    (desc_size,) = struct.unpack_from("<H", sb, 0xFE)
    wide = bool(incompat & INCOMPAT_64BIT) and desc_size >= 64
    if not wide:
        desc_size = 32
    block = 1024 << log_block
    groups = -(-inodes_count // inodes_per_group)
    gdt = dev.read((first_data_block + 1) * block, groups * desc_size)
    tables, bitmaps, uninit = [], [], []
    for g in range(groups):
        d = g * desc_size
        bitmap_lo, table_lo = struct.unpack_from("<4xII", gdt, d)
        (flags,) = struct.unpack_from("<H", gdt, d + 0x12)
        bitmap_hi = table_hi = 0
        if wide:
            bitmap_hi, table_hi = struct.unpack_from("<4xII", gdt, d + 0x20)
        tables.append(table_lo | table_hi << 32)
        bitmaps.append(bitmap_lo | bitmap_hi << 32)
        uninit.append(bool(flags & BG_INODE_UNINIT))
    return Ext4Geometry(
        block, inode_size, inodes_per_group, first_ino, tuple(tables), tuple(bitmaps), tuple(uninit)
    )


def pin_inode(raw: bytes, inode_size: int) -> bytes:
    """An in-use inode with atime/ctime/crtime = mtime and generation/version = 0."""
    buf = bytearray(raw)
    (mtime,) = struct.unpack_from("<I", buf, _I_MTIME)
    struct.pack_into("<I", buf, _I_ATIME, mtime)
    struct.pack_into("<I", buf, _I_CTIME, mtime)
    struct.pack_into("<I", buf, _I_VERSION_LO, 0)
    struct.pack_into("<I", buf, _I_GENERATION, 0)
    if inode_size > GOOD_OLD_INODE_SIZE:
        (extra,) = struct.unpack_from("<H", buf, _I_EXTRA_ISIZE)
        end = GOOD_OLD_INODE_SIZE + extra

        def fits(offset: int) -> bool:
            return offset + 4 <= end

        mtime_extra = (
            struct.unpack_from("<I", buf, _I_MTIME_EXTRA)[0] if fits(_I_MTIME_EXTRA) else 0
        )
        for field in (_I_CTIME_EXTRA, _I_ATIME_EXTRA, _I_CRTIME_EXTRA):
            if fits(field):
                struct.pack_into("<I", buf, field, mtime_extra)
        if fits(_I_CRTIME):
            struct.pack_into("<I", buf, _I_CRTIME, mtime)
        if fits(_I_VERSION_HI):
            struct.pack_into("<I", buf, _I_VERSION_HI, 0)
    return bytes(buf)


def pin_superblock(raw: bytes) -> bytes:
    """The superblock without the builder's mount: mount/write time, count, bytes, path."""
    buf = bytearray(raw)
    (mkfs_time,) = struct.unpack_from("<I", buf, 0x108)
    struct.pack_into("<II", buf, _SB_MTIME, 0, mkfs_time)  # never mounted; written at mkfs
    struct.pack_into("<H", buf, _SB_MNT_COUNT, 0)
    buf[_SB_LAST_MOUNTED : _SB_LAST_MOUNTED + _SB_LAST_MOUNTED_LEN] = bytes(_SB_LAST_MOUNTED_LEN)
    struct.pack_into("<Q", buf, _SB_KBYTES_WRITTEN, 0)
    buf[_SB_WTIME_HI] = buf[0x276]  # s_mkfs_time_hi
    buf[_SB_MTIME_HI] = 0
    return bytes(buf)


def pin_layer(dev: BlockIO, written: Iterable[tuple[int, int]]) -> PinStats:
    """Pin the kernel's own values in the inodes and superblock inside ``written``.

    ``written``: the (offset, length) byte ranges the layer wrote (its extents). Inodes
    outside them belong to lower layers, which were pinned when they were made.
    """
    ranges = sorted((o, o + n) for o, n in written if n > 0)
    if not ranges:
        return PinStats(0, 0)
    sb = dev.read(SUPERBLOCK_OFFSET, 1024)
    if _overlaps(ranges, SUPERBLOCK_OFFSET, SUPERBLOCK_OFFSET + 1024):
        pinned_sb = pin_superblock(sb)
        if pinned_sb != sb:
            dev.write(SUPERBLOCK_OFFSET, pinned_sb)
    geo = read_geometry(dev)
    isz = geo.inode_size_bytes
    pinned = zeroed = 0
    for g, table in enumerate(geo.inode_tables):
        start = table * geo.block_size_bytes
        end = start + geo.inodes_per_group * isz
        bitmap: bytes | None = None
        for lo, hi in ranges:
            if hi <= start or lo >= end:
                continue
            first = (max(lo, start) - start) // isz
            last = (min(hi, end) - start - 1) // isz
            for i in range(first, last + 1):
                offset = start + i * isz
                raw = dev.read(offset, isz)
                if not any(raw):
                    continue
                ino = g * geo.inodes_per_group + i + 1
                if bitmap is None:
                    bitmap = (
                        bytes(geo.block_size_bytes)
                        if geo.inode_uninit[g]
                        else dev.read(
                            geo.inode_bitmaps[g] * geo.block_size_bytes, geo.block_size_bytes
                        )
                    )
                in_use = bool(bitmap[i // 8] >> (i % 8) & 1) or ino < geo.first_ino
                new = pin_inode(raw, isz) if in_use else bytes(isz)
                if new != raw:
                    dev.write(offset, new)
                    if in_use:
                        pinned += 1
                    else:
                        zeroed += 1
    return PinStats(pinned, zeroed)


def _overlaps(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a < hi and b > lo for a, b in ranges)
