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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tidal.blockdev import mounts as blockdev_mounts
from tidal.blockdev.ext4 import is_mountpoint
from tidal.engine.spec import QuotaSpec
from tidal.engine.volume import (
    QuotaVolume,
    VolumePool,
    destroy_volume,
    mount_volume,
    unmount_path,
    volume_from_pool_or_new,
)
from tidal.errors import ConfigError, EngineError, ImageNotFoundError


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
    """Turns an image reference into a read-only lower directory."""

    kind: ClassVar[str]

    @abstractmethod
    def image_config(self, image: str) -> ImageConfig: ...

    @abstractmethod
    def mount_lower(self, image: str, target: Path) -> Path:
        """Make the image's tree available read-only; return the directory to use as lower."""

    @abstractmethod
    def unmount_lower(self, target: Path) -> None: ...


class DirectoryRootfsProvider(RootfsProvider):
    """A plain directory is the lower layer; ``<dir>.config.json`` may hold an OCI config."""

    kind = "dir"

    def image_config(self, image: str) -> ImageConfig:
        side = Path(image.rstrip("/") + ".config.json")
        if side.exists():
            return ImageConfig.from_oci(json.loads(side.read_text()).get("config", {}))
        return ImageConfig()

    def mount_lower(self, image: str, target: Path) -> Path:
        path = Path(image)
        if not path.is_dir():
            raise ImageNotFoundError(f"rootfs directory {image} does not exist")
        return path.resolve()

    def unmount_lower(self, target: Path) -> None:
        return None


class TidalImageRootfsProvider(RootfsProvider):
    """A Tidal block image, mounted lazily and read-only by ``tidal.blockdev``."""

    kind = "tidal"

    def image_config(self, image: str) -> ImageConfig:
        from tidal.image.manifest import Image

        return ImageConfig.from_oci(dict(Image.open(Path(image)).manifest.config))

    def mount_lower(self, image: str, target: Path) -> Path:
        blockdev_mounts.mount_image(image, target)
        return target

    def unmount_lower(self, target: Path) -> None:
        if is_mountpoint(target) or any(
            Path(m.target) == target.resolve() for m in blockdev_mounts.list_mounts()
        ):
            blockdev_mounts.unmount(target, force=True)


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


# --- overlay assembly ----------------------------------------------------------------------


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            overlay_options(lower, upper, work),
            str(target),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise EngineError(
            f"overlay mount at {target} (lower {lower}) failed: {proc.stderr.strip()}"
        )


def create_quota_base(
    cdir: Path, quota: QuotaSpec | None, pool: VolumePool | None = None
) -> dict[str, Any] | None:
    """The container's writable-layer volume (None: no quota, upper lives on the data disk)."""
    if quota is None:
        return None
    inodes = quota.inodes or quota.size_bytes // 16384
    vol = volume_from_pool_or_new(pool, cdir / "disk.img", cdir / "disk", quota.size_bytes, inodes)
    return vol.__dict__.copy()


def lower_mountpoint(images_dir: Path, image: str) -> Path:
    """Where an image's read-only tree is mounted, shared by all containers using it."""
    key = hashlib.sha256(str(Path(image).resolve()).encode()).hexdigest()[:16]
    return images_dir / key


def mount_lower(image: str, mountpoint: Path) -> Path:
    """The image's lower directory, mounting it at ``mountpoint`` unless already there."""
    provider = provider_for(image)
    if provider.kind == DirectoryRootfsProvider.kind:
        return provider.mount_lower(image, mountpoint)
    if is_mountpoint(mountpoint):
        return mountpoint
    provider.unmount_lower(mountpoint)  # a stale record of a dead mount
    return provider.mount_lower(image, mountpoint)


def release_lower(state: dict[str, Any]) -> None:
    """Unmount a (no longer used) image mount; the caller checks nobody else uses it."""
    provider_by_kind(state["kind"]).unmount_lower(Path(state["lower_mountpoint"]))
    if state["kind"] != DirectoryRootfsProvider.kind:
        with contextlib.suppress(OSError):
            Path(state["lower_mountpoint"]).rmdir()


def mount_rootfs(
    cdir: Path,
    image: str,
    volume: dict[str, Any] | None,
    lower_mp: Path,
    generation: int = 0,
) -> dict[str, Any]:
    """Overlay at ``cdir/rootfs`` over the image's (shared) lower; returns the state to record.

    The lower is mounted at ``lower_mp`` if no other container has mounted it already; the
    caller serialises calls per ``lower_mp`` and decides when to release it.
    """
    provider = provider_for(image)
    base = Path(volume["mountpoint"]) if volume else cdir / "layer"
    lower = mount_lower(image, lower_mp)
    state: dict[str, Any] = {
        "kind": provider.kind,
        "image": str(Path(image).resolve()),
        "generation": generation,
        "lower_mountpoint": str(lower_mp),
        "lower": str(lower),
        "upper": str(base / f"upper.{generation}"),
        "work": str(base / f"work.{generation}"),
        "merged": str(cdir / "rootfs"),
        "volume": volume,
    }
    mount_overlay(lower, Path(state["upper"]), Path(state["work"]), Path(state["merged"]))
    return state


def unmount_overlay(state: dict[str, Any], *, drop_layer: bool = False) -> None:
    """Unmount the container's overlay; ``drop_layer`` also deletes this generation's upper."""
    if not state:
        return
    unmount_path(Path(state["merged"]))
    if drop_layer:
        for key in ("upper", "work"):
            shutil.rmtree(state[key], ignore_errors=True)


def ensure_rootfs_mounted(state: dict[str, Any]) -> dict[str, Any]:
    """Remount after a host reboot or a lost mount; a no-op when everything is in place."""
    if state.get("volume"):
        mount_volume(QuotaVolume(**state["volume"]))
    if is_mountpoint(Path(state["merged"])):
        return state
    mount_lower(state["image"], Path(state["lower_mountpoint"]))
    mount_overlay(
        Path(state["lower"]), Path(state["upper"]), Path(state["work"]), Path(state["merged"])
    )
    return state


def destroy_volume_of(state: dict[str, Any]) -> None:
    """Unmount and delete the writable-layer volume (and so free its loop device)."""
    if state.get("volume"):
        destroy_volume(QuotaVolume(**state["volume"]))
