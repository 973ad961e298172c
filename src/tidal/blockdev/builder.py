"""Build Tidal images: from a directory tree, or from an OCI / docker-archive image.

Every block layer is made the way the image will be used: a writable layer over the layers
below is mounted through the FUSE block device, loop and ext4; the change is applied with
ordinary file operations; the filesystem is unmounted cleanly; the writable layer is committed
into a ZFile blob. So the first layer holds the fresh ext4 (``mkfs`` writes only metadata:
the base device is a sparse, all-zero virtual disk) and each later layer holds exactly the
blocks its OCI layer changed. The image is assembled in a hidden directory next to the output
and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tidal import proc
from tidal.blockdev import mounts
from tidal.blockdev.ext4 import READWRITE_OPTIONS, Ext4Format
from tidal.blockdev.ext4_pins import BUILD_TIME_S, pin_layer
from tidal.blockdev.layer_tar import LayerScan, TreeWriter, extract, free_name, scan_layer
from tidal.blockdev.oci_archive import SourceImage, SourceLayer, open_source_image
from tidal.blockdev.settings import BlockdevSettings, load_settings
from tidal.errors import BuildError, ImageNotFoundError, NotFoundError, TidalError
from tidal.image.manifest import (
    EXACT_ROOT_ANNOTATION,
    Image,
    ImageManifest,
    ImageWriter,
    LayerRecord,
    blob_path,
)
from tidal.image.zfile import Codec
from tidal.units import SECTOR_BYTES, MiB, format_size

COPY_TIMEOUT_S = 24 * 3600.0
"""``cp -a`` of a root tree: bounded only so a wedged copy cannot hang a build forever."""

# --- reproducible layers -------------------------------------------------------------------
# The same OCI layer on the same parent must give the byte-identical block layer, so every
# input of the bytes that is not the tar or the parent is pinned here (ext4_pins.py pins what
# the kernel stamps). Each constant says which source of difference it removes.
BUILD_FS_UUID = "7ddc0a7a-6e8b-4b38-9e53-0c2d6a1e4f10"
"""mkfs picks a random UUID, which is in the superblock and seeds the group checksums. ext4
does not need UUIDs to differ between filesystems (unlike xfs or btrfs)."""
BUILD_HASH_SEED = "3c6f1d2e-8a49-4f0b-b1d5-6e2a9c7b8d01"
"""mkfs picks a random directory-index hash seed; it orders large directories' index blocks
and picks the block group of every top-level directory (the Orlov allocator)."""
BUILD_MOUNT_OPTIONS = READWRITE_OPTIONS + ",nodelalloc"
"""With delayed allocation the kernel's flusher threads place data blocks whenever they run
(every few seconds, or under memory pressure), so placement depended on timing; without it
each block is placed by the write that makes it, in the tar's order."""
LOST_AND_FOUND = "lost+found"


def reproducible_format(inode_count: int, *, journal: bool = False) -> Ext4Format:
    """The builder's ext4: fixed UUID, hash seed and mkfs clock; no metadata checksums, since
    a pinned inode generation would invalidate every checksum seeded with it (ext4_pins.py).
    A journal (``[blockdev] ext4_journal``) holds commit times, so it is not reproducible."""
    return Ext4Format(
        inode_count=inode_count,
        journal=journal,
        uuid=BUILD_FS_UUID,
        hash_seed=BUILD_HASH_SEED,
        metadata_csum=False,
        fake_time_s=BUILD_TIME_S,
    )


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """Run the layer's writes on one CPU: ext4's allocator keeps per-CPU "locality groups"
    for small files and reads per-CPU counters when it places directories, so a writer that
    migrated between CPUs placed blocks differently from one that did not. Children (``cp``)
    inherit the mask."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class BuildProgress(Protocol):
    """Where the builder reports long work (the CLI shows it with rich on stderr)."""

    def step(self, description: str, total_bytes: int | None = None) -> None:
        """A new phase; ``total_bytes`` if its size is known (then :meth:`advance` follows)."""

    def advance(self, n_bytes: int) -> None: ...


@dataclass(frozen=True)
class BuildResult:
    image_dir: Path
    manifest: ImageManifest
    seconds: float
    source_bytes: int
    """Bytes of the source (sum of layer blobs, or of the directory's files)."""

    @property
    def stored_bytes(self) -> int:
        return sum(r.size_bytes for r in self.manifest.layers)


def choose_size(content_bytes: int, entries: int, settings: BlockdevSettings) -> int:
    """Virtual disk size: content x factor + slack (+ a block per inode), MiB-aligned.

    Holes cost nothing (the base device is sparse), so the size errs on the generous side;
    running out of space half-way through a conversion is the expensive mistake.
    """
    want = int((content_bytes + entries * 4096) * settings.size_factor) + settings.slack_bytes
    size = max(settings.min_size_bytes, want)
    return -(-size // MiB) * MiB


def choose_inodes(entries: int, size_bytes: int, settings: BlockdevSettings) -> int:
    return max(size_bytes // settings.bytes_per_inode, 2 * entries + 1024)


def choose_geometry(
    content_bytes: int, entries: int, settings: BlockdevSettings
) -> tuple[int, int]:
    """(virtual disk bytes, inode count) of a build: a power of two at least
    :func:`choose_size`, with the inode count that size gives by ``bytes_per_inode``.

    The geometry is in every block of the first layer, so it must not move when a later
    layer is added: a v2 image on the same base makes the same base layer as long as its total
    stays inside the same power-of-two step (crossing a step makes every layer anew).
    """
    size = 1 << (choose_size(content_bytes, entries, settings) - 1).bit_length()
    while size // settings.bytes_per_inode < 2 * entries + 1024:
        size *= 2
    return size, size // settings.bytes_per_inode


@contextlib.contextmanager
def _staging(out_image: Path) -> Iterator[Path]:
    """A hidden work directory beside ``out_image``, renamed to it on success."""
    if out_image.exists() and (not out_image.is_dir() or any(out_image.iterdir())):
        raise BuildError(f"{out_image} already exists; remove it or choose another output path")
    out_image.parent.mkdir(parents=True, exist_ok=True)
    work = out_image.parent / f".{out_image.name}.build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        for scratch in (".mnt", ".writable"):
            shutil.rmtree(work / scratch, ignore_errors=True)
        if out_image.exists():
            out_image.rmdir()
        os.replace(work, out_image)
    except BaseException:
        with contextlib.suppress(TidalError, OSError):
            mounts.unmount(work / ".mnt", force=True)
        shutil.rmtree(work, ignore_errors=True)
        raise


def layer_codec(
    codec: Codec | str | None, settings: BlockdevSettings
) -> tuple[Codec | str, int | None]:
    """The codec and level a new layer is committed with: the caller's codec at its own
    default level, else ``[blockdev] codec`` at ``[blockdev] codec_level``."""
    if codec is not None:
        return codec, None
    return settings.codec, settings.codec_level


class _LayerBuilder:
    """Makes one block layer per call to :meth:`layer`, on top of the previous ones."""

    def __init__(
        self,
        work: Path,
        size_bytes: int,
        fmt: Ext4Format,
        codec: Codec | str | None,
        settings: BlockdevSettings,
        progress: BuildProgress | None,
    ) -> None:
        self.work = work
        self.writer = ImageWriter(work, size_bytes)
        self.writer.write_manifest()
        self.fmt = fmt
        self.codec, self.level = layer_codec(codec, settings)
        self.settings = settings
        self.progress = progress
        self.mnt = work / ".mnt"
        self.wdir = work / ".writable"

    def layer(
        self,
        name: str,
        fill: Callable[[Path], None],
        *,
        total_bytes: int | None = None,
        source_digest: str | None = None,
        source_diff_id: str | None = None,
        top_level: Collection[str] = (),
    ) -> None:
        """``top_level``: the root-level names ``fill`` may create (for the first layer, mkfs's
        ``/lost+found`` waits under a name none of them has)."""
        first = not self.writer.records
        if self.progress:
            self.progress.step(f"{name}: mounting writable layer")
        mounts.mount_image(
            self.work,
            self.mnt,
            writable_dir=self.wdir,
            format_ext4=self.fmt if first else None,
            settings=self.settings,
            ext4_options=BUILD_MOUNT_OPTIONS,
            owner_pid=os.getpid(),
        )
        try:
            aside = _set_aside_lost_and_found(self.mnt, top_level) if first else None
            if first:
                _time_root(self.mnt)
            if self.progress:
                self.progress.step(f"{name}: writing files", total_bytes)
            with _one_cpu():
                fill(self.mnt)
            if aside is not None:
                _remove_set_aside(self.mnt, aside)
        except BaseException:
            mounts.unmount(self.mnt, force=True)
            raise
        if self.progress:
            self.progress.step(f"{name}: unmounting")
        mounts.unmount(self.mnt)
        if self.progress:
            self.progress.step(f"{name}: committing ({self.codec})")
        image = Image.open(self.work)
        with image.writable(self.wdir, create=False) as wl:
            pin_layer(
                wl,
                [
                    (e.lba_sectors * SECTOR_BYTES, e.length_sectors * SECTOR_BYTES)
                    for e in wl.index
                    if not e.zeroed
                ],
            )
            self.writer.commit_layer(
                wl,
                codec=self.codec,
                level=self.level,
                chunk_size_bytes=self.settings.chunk_size_bytes,
                source_digest=source_digest,
                source_diff_id=source_diff_id,
            )
        shutil.rmtree(self.wdir)
        self.writer.write_manifest()


def _time_root(root: Path) -> None:
    """The root's times are the build clock's until a tar entry for ``/`` sets them."""
    os.utime(root, ns=(BUILD_TIME_S * 10**9, BUILD_TIME_S * 10**9))


def _set_aside_lost_and_found(root: Path, top_level: Collection[str]) -> str:
    """The image's root is exactly its tree: no ``/lost+found`` (mkfs makes one; e2fsck
    recreates it if it ever needs it), but a tree's own ``/lost+found`` is kept. mkfs's is
    renamed out of the tree's way (a name neither the root nor ``top_level`` has) and
    removed after the first layer's last create (:func:`_remove_set_aside`): removed before,
    the clock decided whether a create reused its inode (see ``layer_tar``)."""
    name = free_name(f".tidal-mkfs-{LOST_AND_FOUND}", set(os.listdir(root)) | set(top_level))
    os.rename(root / LOST_AND_FOUND, root / name)
    return name


def _remove_set_aside(root: Path, name: str) -> None:
    """Remove mkfs's ``/lost+found``; the root keeps the times its tree gave it."""
    st = os.stat(root)
    with contextlib.suppress(FileNotFoundError):  # an opaque root cleared it already
        (root / name).rmdir()
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))


def convert_oci(
    archive: str | os.PathLike[str],
    out_image: str | os.PathLike[str],
    *,
    codec: Codec | str | None = None,
    size_bytes: int | None = None,
    settings: BlockdevSettings | None = None,
    progress: BuildProgress | None = None,
) -> BuildResult:
    """Convert an OCI layout (dir or tar) or docker-archive into a Tidal image, layer by layer."""
    return convert_source_image(
        open_source_image(archive),
        out_image,
        codec=codec,
        size_bytes=size_bytes,
        settings=settings,
        progress=progress,
    )


def convert_source_image(
    source: SourceImage,
    out_image: str | os.PathLike[str],
    *,
    codec: Codec | str | None = None,
    size_bytes: int | None = None,
    settings: BlockdevSettings | None = None,
    progress: BuildProgress | None = None,
) -> BuildResult:
    """Convert any :class:`SourceImage` (its layers' ``open_blob`` may stream from a registry)."""
    settings = settings or load_settings()
    t0 = time.monotonic()
    if not source.layers:
        raise BuildError(f"{source.name}: the image has no layers; nothing to convert")
    scans: list[LayerScan] = []
    for i, layer in enumerate(source.layers):
        if progress:
            progress.step(f"scanning layer {i + 1}/{len(source.layers)} ({layer.digest[:19]})")
        scans.append(_scan(layer, i))
        declared = sum(s.file_bytes for s in scans)
        if declared > settings.max_content_bytes:
            raise BuildError(
                f"{source.name}: layers 1-{i + 1} declare {format_size(declared)} of file "
                f"content (largest file in layer {i + 1}: {format_size(scans[-1].largest_file_bytes)}), "
                f"over [blockdev] max_content_bytes ({format_size(settings.max_content_bytes)}); "
                "a sparse or lying tar? raise the limit if the image is really this big"
            )
    content = sum(s.content_bytes for s in scans)
    entries = sum(s.entries for s in scans)
    size, inodes = choose_geometry(content, entries, settings)
    if size_bytes:
        size, inodes = size_bytes, choose_inodes(entries, size_bytes, settings)
    fmt = reproducible_format(inodes, journal=settings.ext4_journal)
    out = Path(out_image)
    with _staging(out) as work:
        builder = _LayerBuilder(work, size, fmt, codec, settings, progress)
        for i, (layer, scan) in enumerate(zip(source.layers, scans, strict=True)):
            builder.layer(
                f"layer {i + 1}/{len(source.layers)}",
                functools.partial(_apply, layer, scan, index=i, progress=progress),
                total_bytes=scan.file_bytes,
                source_digest=layer.digest,
                source_diff_id=layer.diff_id,
                top_level=scan.top_level,
            )
        manifest = builder.writer.write_manifest(
            config=dict(source.config.get("config") or {}),
            annotations=_annotations(source),
        )
    return BuildResult(
        out, manifest, time.monotonic() - t0, sum(la.size_bytes for la in source.layers)
    )


def _layer_name(layer: SourceLayer, i: int) -> str:
    return f"layer {i} ({layer.digest[:19]})"


def _scan(layer: SourceLayer, i: int) -> LayerScan:
    with layer.open_tar() as tf:
        return scan_layer(tf, layer=_layer_name(layer, i))


def _apply(
    layer: SourceLayer,
    scan: LayerScan,
    root: Path,
    *,
    index: int,
    progress: BuildProgress | None,
) -> None:
    on_bytes = progress.advance if progress else None
    with TreeWriter(
        root, layer=_layer_name(layer, index), on_bytes=on_bytes, reserved=scan.top_level
    ) as writer:
        writer.apply_whiteouts(scan)
        with layer.open_tar() as tf:
            extract(tf, writer)


def _annotations(source: SourceImage) -> dict[str, str]:
    ann = {"io.tidal.source": source.name, EXACT_ROOT_ANNOTATION: "true"}
    if source.manifest_digest:
        ann["io.tidal.source.manifest-digest"] = source.manifest_digest
    for key in ("architecture", "os", "created"):
        if isinstance(source.config.get(key), str):
            ann[f"io.tidal.source.{key}"] = source.config[key]
    return ann


def _measure_tree(root: Path) -> tuple[int, int]:
    """(content bytes rounded to 4 KiB blocks, entries) of a tree; hard links count once."""
    seen: set[tuple[int, int]] = set()
    content = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                content += -(-st.st_size // 4096) * 4096
    return content, entries


def build_from_dir(
    src_dir: str | os.PathLike[str],
    out_image: str | os.PathLike[str],
    *,
    codec: Codec | str | None = None,
    size_bytes: int | None = None,
    config: dict[str, Any] | None = None,
    settings: BlockdevSettings | None = None,
    progress: BuildProgress | None = None,
) -> BuildResult:
    """A one-layer image holding a copy of ``src_dir`` (owners, modes, links, xattrs, ACLs)."""
    settings = settings or load_settings()
    t0 = time.monotonic()
    src = Path(src_dir)
    if not src.is_dir():
        raise NotFoundError(f"{src} is not a directory; `tidal image build` takes a root tree")
    if progress:
        progress.step(f"measuring {src}")
    content, entries = _measure_tree(src)
    size, inodes = choose_geometry(content, entries, settings)
    if size_bytes:
        size, inodes = size_bytes, choose_inodes(entries, size_bytes, settings)
    fmt = reproducible_format(inodes, journal=settings.ext4_journal)

    def copy(root: Path) -> None:
        proc.run(
            ["cp", "-a", "--preserve=all", "--no-dereference", f"{src}/.", f"{root}/"],
            what=f"copying {src} into the image",
            error=BuildError,
            timeout_s=COPY_TIMEOUT_S,
        )

    with _staging(Path(out_image)) as work:
        builder = _LayerBuilder(work, size, fmt, codec, settings, progress)
        builder.layer(f"{src}", copy, top_level=os.listdir(src))
        manifest = builder.writer.write_manifest(
            config=dict(config or {}),
            annotations={"io.tidal.source": str(src.resolve()), EXACT_ROOT_ANNOTATION: "true"},
        )
    return BuildResult(Path(out_image), manifest, time.monotonic() - t0, content)


def commit_writable(
    image_dir: str | os.PathLike[str],
    writable_dir: str | os.PathLike[str],
    out_image: str | os.PathLike[str] | None = None,
    *,
    codec: Codec | str | None = None,
    settings: BlockdevSettings | None = None,
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
        settings = settings or load_settings()
        chosen, level = layer_codec(codec, settings)
        rec, _ = writer.commit_layer(
            wl, codec=chosen, level=level, chunk_size_bytes=settings.chunk_size_bytes
        )
    writer.write_manifest(
        config=image.manifest.config,
        annotations=image.manifest.annotations,
        fs_type=image.manifest.fs_type,
    )
    return rec
