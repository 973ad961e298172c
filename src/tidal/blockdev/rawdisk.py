"""Export an image's merged block device as a sparse raw disk file, and commit a writable layer.

The raw disk is what independent tools understand (``e2fsck -fn``, ``debugfs``, a VM): the
virtual device byte for byte, with all-zero runs left as holes so a mostly empty 10 GiB
virtual disk costs only its data on the host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidal.errors import BuildError, ImageNotFoundError
from tidal.image.manifest import Image, ImageWriter, LayerRecord, blob_path
from tidal.image.zfile import Codec
from tidal.units import MiB

EXPORT_WINDOW_BYTES = 4 * MiB
SPARSE_GRAIN_BYTES = 64 * 1024
"""All-zero runs of this size become holes (ext4 allocates in 4 KiB blocks; 64 KiB keeps
the number of writes low)."""


@dataclass(frozen=True)
class ExportResult:
    size_bytes: int
    data_bytes: int
    """Bytes actually written (the rest are holes)."""


def export_raw(
    image_dir: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the image's virtual disk to ``out_file``, sparse."""
    image = Image.open(image_dir)
    view = image.merged_view()
    size = view.size_bytes
    written = 0
    out = Path(out_file)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as fh:
        for offset in range(0, size, EXPORT_WINDOW_BYTES):
            n = min(EXPORT_WINDOW_BYTES, size - offset)
            data = memoryview(view.read(offset, n))
            for sub in range(0, n, SPARSE_GRAIN_BYTES):
                piece = data[sub : sub + SPARSE_GRAIN_BYTES]
                if piece.tobytes().count(0) != len(piece):
                    os.pwrite(fh.fileno(), piece, offset + sub)
                    written += len(piece)
            if on_progress:
                on_progress(offset + n, size)
        fh.truncate(size)
    os.replace(tmp, out)
    return ExportResult(size, written)


def commit_writable(
    image_dir: str | os.PathLike[str],
    writable_dir: str | os.PathLike[str],
    out_image: str | os.PathLike[str] | None = None,
    *,
    codec: Codec | str = Codec.LZ4,
) -> LayerRecord:
    """Turn a writable layer into a new top layer: of ``out_image`` (a copy) or in place.

    The writable layer must not be mounted (its server flushes it at unmount).
    """
    src = Path(image_dir)
    image = Image.open(src)
    if not (Path(writable_dir) / "meta.json").exists():
        raise ImageNotFoundError(f"no writable layer in {writable_dir}")
    dest = Path(out_image) if out_image is not None else src
    if dest != src:
        if dest.exists():
            raise BuildError(f"{dest} already exists; choose another output path")
        (dest / "blobs" / "sha256").mkdir(parents=True)
        for rec in image.manifest.layers:
            target = blob_path(dest, rec.digest)
            try:
                os.link(blob_path(src, rec.digest), target)  # blobs are immutable: share them
            except OSError:
                shutil.copy2(blob_path(src, rec.digest), target)
    writer = ImageWriter(dest, image.manifest.size_bytes)
    for rec in image.manifest.layers:
        writer.add_record(rec)
    with image.writable(writable_dir, create=False) as wl:
        rec, _ = writer.commit_layer(wl, codec=codec)
    writer.write_manifest(
        config=image.manifest.config,
        annotations=image.manifest.annotations,
        fs_type=image.manifest.fs_type,
    )
    return rec
