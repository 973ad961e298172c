"""The merged view: a stack of layers seen top-down as one block device."""

from __future__ import annotations

from collections.abc import Sequence

from tidal.errors import LayerError
from tidal.image.extents import Segment
from tidal.image.layer import Layer
from tidal.units import SECTOR_BYTES


def resolve(layers: Sequence[Layer], lba: int, count: int) -> list[tuple[Segment, Layer | None]]:
    """Which layer supplies each piece of ``[lba, lba+count)``; top (last) layer wins.

    Returns segments sorted by lba; a segment with layer ``None`` is a hole (zeros).
    """
    found: list[tuple[Segment, Layer | None]] = []
    pending = [(lba, count)]
    for layer in reversed(layers):
        if not pending:
            break
        nxt: list[tuple[int, int]] = []
        for lo, n in pending:
            for seg in layer.index.lookup(lo, n):
                if seg.extent is None:
                    nxt.append((seg.lba_sectors, seg.length_sectors))
                else:
                    found.append((seg, layer))
        pending = nxt
    found.extend((Segment(lo, n, None), None) for lo, n in pending)
    found.sort(key=lambda item: item[0].lba_sectors)
    return found


def read_sectors(layers: Sequence[Layer], lba: int, count: int) -> bytearray:
    """Sectors ``[lba, lba+count)`` of the stack, as one buffer."""
    buf = bytearray(count * SECTOR_BYTES)
    for seg, layer in resolve(layers, lba, count):
        ext = seg.extent
        if layer is None or ext is None or ext.zeroed:
            continue  # zeros already
        start = (seg.lba_sectors - lba) * SECTOR_BYTES
        buf[start : start + seg.length_sectors * SECTOR_BYTES] = layer.read_data(
            ext.data_offset_sectors * SECTOR_BYTES, ext.length_sectors * SECTOR_BYTES
        )
    return buf


class MergedView:
    """The stack of read-only layers seen top-down, as a read-only block device.

    ``layers[0]`` is the bottom. Sectors no layer covers read as zeros. Reads need not be
    sector aligned.
    """

    readonly = True

    def __init__(self, layers: Sequence[Layer], size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % SECTOR_BYTES:
            raise LayerError(
                f"device size {size_bytes} must be a positive multiple of {SECTOR_BYTES}"
            )
        self.layers = list(layers)
        self._size = size_bytes

    @property
    def size_bytes(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        check_device_range(self._size, offset, length)
        if length == 0:
            return b""
        lba = offset // SECTOR_BYTES
        end = -(-(offset + length) // SECTOR_BYTES)
        buf = read_sectors(self.layers, lba, end - lba)
        skip = offset - lba * SECTOR_BYTES
        return bytes(buf[skip : skip + length])

    def write(self, offset: int, data: bytes) -> None:
        raise LayerError("this image is mounted read-only; add a writable layer to write")

    def discard(self, offset: int, length: int) -> None:
        raise LayerError("this image is mounted read-only; add a writable layer to discard")

    def flush(self) -> None:
        return None


def check_device_range(size_bytes: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise LayerError(
            f"access [{offset}, {offset + length}) is outside the {size_bytes}-byte device"
        )
