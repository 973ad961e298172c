"""Read-only layers and the merged view of a layer stack.

A read-only layer is ONE blob: a ZFile whose raw data is the layer's changed sectors packed
back to back in LBA order, and whose metadata payload is the layer's extent index. Opening a
layer therefore needs only the blob's tail; its data is read chunk by chunk on demand.
"""

from __future__ import annotations

from typing import Protocol

from tidal.errors import LayerError
from tidal.image.extents import ExtentMap
from tidal.image.source import RandomAccessSource
from tidal.image.zfile import ZFileReader
from tidal.units import SECTOR_BYTES


class Layer(Protocol):
    """What the merged view needs of a layer: its index and its data by byte offset."""

    @property
    def index(self) -> ExtentMap: ...

    def read_data(self, offset: int, length: int) -> bytes: ...


class ReadOnlyLayer:
    """A committed layer opened from any random-access source."""

    def __init__(self, source: RandomAccessSource, **reader_kwargs: object) -> None:
        self.zfile = ZFileReader(source, **reader_kwargs)  # type: ignore[arg-type]
        self.index = ExtentMap.deserialize(self.zfile.metadata, name=source.name)
        data_sectors = self.zfile.raw_size_bytes // SECTOR_BYTES
        for e in self.index:
            if not e.zeroed and e.data_offset_sectors + e.length_sectors > data_sectors:
                raise LayerError(
                    f"{source.name}: extent at lba {e.lba_sectors} points past the layer's data"
                )

    @property
    def name(self) -> str:
        return self.zfile.source.name

    def read_data(self, offset: int, length: int) -> bytes:
        return self.zfile.read(offset, length)
