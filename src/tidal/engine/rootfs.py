"""Container root filesystems: a read-only lower from a :class:`RootfsProvider`, overlayfs on top.

The seam: a provider turns an image reference into a read-only directory (and the image's
default command/env). :class:`TidalImageRootfsProvider` mounts a Tidal block image lazily with
``tidal.blockdev.mounts.mount_image`` (FUSE -> loop -> ext4, read-only);
:class:`DirectoryRootfsProvider` uses a plain directory as is (tests, and the benchmark's
baseline). Either way the writable layer is overlayfs whose upper and work directories live on
the container's quota volume (see :mod:`tidal.engine.volume`).

Why overlayfs rather than Tidal's own writable block layer: the block layer would give every
container its own FUSE-served read-write device, so every write would cross user space and
the image's page cache could not be shared between containers of one image. With one shared
read-only image mount and overlayfs per container, writes stay in the kernel, and the quota
volume gives a hard byte *and* inode limit that a writable block layer (bytes only) would not.

One read-only mount per image serves every container of that image (under
``<state>/images/<key>``): a second container of an image starts without another FUSE server
and shares the page cache of the first. The engine counts users from its database, so the
count survives daemon restarts, and unmounts the image with its last container.

Each (re)mount has a generation number so that ``upgrade`` can prepare the new image next to
the old one and roll back without losing the old writable layer.

Nothing here mounts: providers and :func:`plan_layer` return what to mount as data (a mount
plan of :class:`~tidal.engine.state.Mount` values, as containerd's snapshotters return
mounts), and the engine's one :class:`~tidal.engine.mounter.Mounter` executes it. The state
recorded per container is frozen data too (:class:`~tidal.engine.state.RootfsState`), stored
as the same JSON object the API has always shown; it lives in :mod:`tidal.engine.state` so that
reading a record loads none of this planning code.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tidal.engine.state import TIDAL_IMAGE, LayerState, Mount, QuotaVolume, overlay_mount
from tidal.errors import ConfigError, ImageNotFoundError


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config the engine uses to fill in a spec."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None

    @classmethod
    def from_oci(cls, cfg: dict[str, Any]) -> ImageConfig:
        env = []
        for item in cfg.get("Env") or []:
            k, _, v = str(item).partition("=")
            env.append((k, v))
        return cls(
            entrypoint=tuple(cfg.get("Entrypoint") or ()),
            cmd=tuple(cfg.get("Cmd") or ()),
            env=tuple(env),
            workdir=cfg.get("WorkingDir") or None,
        )

    @property
    def default_command(self) -> tuple[str, ...]:
        return (*self.entrypoint, *self.cmd)


class RootfsProvider(ABC):
    """Turns an image reference into a read-only lower directory and what to mount for it."""

    kind: ClassVar[str]

    @abstractmethod
    def image_config(self, image: str) -> ImageConfig: ...

    @abstractmethod
    def lower_dir(self, image: str, mountpoint: Path) -> Path:
        """The directory to use as overlay lower (checks that the image exists)."""

    @abstractmethod
    def lower_mounts(self, image: str, mountpoint: Path) -> tuple[Mount, ...]:
        """What must be mounted for :meth:`lower_dir` to hold the image's tree (pure)."""


class DirectoryRootfsProvider(RootfsProvider):
    """A plain directory is the lower layer; ``<dir>.config.json`` may hold an OCI config."""

    kind = "dir"

    def image_config(self, image: str) -> ImageConfig:
        side = Path(image.rstrip("/") + ".config.json")
        if side.exists():
            return ImageConfig.from_oci(json.loads(side.read_text()).get("config", {}))
        return ImageConfig()

    def lower_dir(self, image: str, mountpoint: Path) -> Path:
        path = Path(image)
        if not path.is_dir():
            raise ImageNotFoundError(f"rootfs directory {image} does not exist")
        return path.resolve()

    def lower_mounts(self, image: str, mountpoint: Path) -> tuple[Mount, ...]:
        return ()


class TidalImageRootfsProvider(RootfsProvider):
    """A Tidal block image, mounted lazily and read-only by ``tidal.blockdev``."""

    kind = "tidal"

    def image_config(self, image: str) -> ImageConfig:
        from tidal.image.manifest import Image

        return ImageConfig.from_oci(dict(Image.open(Path(image)).manifest.config))

    def lower_dir(self, image: str, mountpoint: Path) -> Path:
        return mountpoint

    def lower_mounts(self, image: str, mountpoint: Path) -> tuple[Mount, ...]:
        return (Mount(TIDAL_IMAGE, image, str(mountpoint), shared=True),)


def provider_for(image: str) -> RootfsProvider:
    """Tidal image directory (has ``manifest.json``) or a plain rootfs directory."""
    path = Path(image)
    if (path / "manifest.json").is_file():
        return TidalImageRootfsProvider()
    if path.is_dir():
        return DirectoryRootfsProvider()
    raise ImageNotFoundError(
        f"image {image!r} is neither a Tidal image directory (with manifest.json) nor a rootfs "
        "directory; build one with 'tidal image build DIR -o IMAGE'"
    )


def provider_by_kind(kind: str) -> RootfsProvider:
    if kind == TidalImageRootfsProvider.kind:
        return TidalImageRootfsProvider()
    if kind == DirectoryRootfsProvider.kind:
        return DirectoryRootfsProvider()
    raise ConfigError(f"unknown rootfs kind {kind!r} in state")


# --- state and plans ------------------------------------------------------------------------


def lower_mounts(layer: LayerState) -> tuple[Mount, ...]:
    """The shared image mount under a layer (none for a directory rootfs)."""
    return provider_by_kind(layer.kind).lower_mounts(layer.image, Path(layer.lower_mountpoint))


def layer_plan(layer: LayerState) -> tuple[Mount, ...]:
    """Everything to mount, in order, for this root to exist (a read-only root: the lower)."""
    if layer.readonly:
        return lower_mounts(layer)
    return (*lower_mounts(layer), layer.overlay)


def lower_mountpoint(images_dir: Path, image: str) -> Path:
    """Where an image's read-only tree is mounted, shared by all containers using it."""
    key = hashlib.sha256(str(Path(image).resolve()).encode()).hexdigest()[:16]
    return images_dir / key


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    return overlay_mount(str(lower), str(upper), str(work), "").options[0]


def plan_layer(
    cdir: Path,
    image: str,
    volume: QuotaVolume | None,
    lower_mp: Path,
    generation: int = 0,
    readonly: bool = False,
) -> LayerState:
    """Generation ``generation`` of the container's root: an overlay at ``cdir/rootfs`` over
    the image's lower at ``lower_mp`` (shared), upper and work on the quota volume if any;
    ``readonly``: the lower itself, no overlay (a pod's sandbox, which writes nothing)."""
    provider = provider_for(image)
    base = Path(volume.mountpoint) if volume else cdir / "layer"
    lower = provider.lower_dir(image, lower_mp)
    return LayerState(
        kind=provider.kind,
        image=str(Path(image).resolve()),
        generation=generation,
        lower_mountpoint=str(lower_mp),
        lower=str(lower),
        upper="" if readonly else str(base / f"upper.{generation}"),
        work="" if readonly else str(base / f"work.{generation}"),
        merged=str(lower) if readonly else str(cdir / "rootfs"),
        readonly=readonly,
    )


def make_layer_dirs(layer: LayerState) -> None:
    """The overlay's upper and work directories (the rootfs side's part, as a snapshotter's)."""
    if layer.readonly:
        return
    for d in (layer.upper, layer.work):
        Path(d).mkdir(parents=True, exist_ok=True)


def drop_layer_dirs(layer: LayerState) -> None:
    """Delete one generation's writable layer (after an upgrade, or a rolled-back one)."""
    import shutil

    if layer.readonly:
        return  # nothing of its own: the tree is the image's
    for d in (layer.upper, layer.work):
        shutil.rmtree(d, ignore_errors=True)
