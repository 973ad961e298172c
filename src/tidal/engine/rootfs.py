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
plan of :class:`~tidal.engine.mounter.Mount` values, as containerd's snapshotters return
mounts), and the engine's one :class:`~tidal.engine.mounter.Mounter` executes it. The state
recorded per container is frozen data too (:class:`RootfsState`), stored as the same JSON
object the API has always shown.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from tidal.engine.mounter import TIDAL_IMAGE, Mount, overlay_mount
from tidal.engine.volume import QuotaVolume
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


@dataclass(frozen=True)
class LayerState:
    """One generation of a container's root: an overlay over an image's (shared) lower."""

    kind: str
    image: str
    generation: int
    lower_mountpoint: str
    lower: str
    upper: str
    work: str
    merged: str

    @property
    def lower_mounts(self) -> tuple[Mount, ...]:
        """The shared image mount (none for a directory rootfs)."""
        return provider_by_kind(self.kind).lower_mounts(self.image, Path(self.lower_mountpoint))

    @property
    def overlay(self) -> Mount:
        return overlay_mount(self.lower, self.upper, self.work, self.merged)

    @property
    def plan(self) -> tuple[Mount, ...]:
        """Everything to mount, in order, for this root to exist."""
        return (*self.lower_mounts, self.overlay)


@dataclass(frozen=True)
class VolumeState:
    """One ``--volume``: a host directory, or an engine-made one (optionally a quota volume)."""

    target: str
    source: str | None
    path: str
    volume: QuotaVolume | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "volume": self.volume.to_json() if self.volume else None,
            "path": self.path,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeState:
        return cls(
            target=str(data["target"]),
            source=data.get("source"),
            path=str(data["path"]),
            volume=QuotaVolume.from_json(data.get("volume")),
        )


@dataclass(frozen=True)
class RootfsState:
    """What a container holds on the host, recorded step by step as it is made.

    ``volume`` is the writable layer's quota volume, ``layer`` the mounted generation,
    ``volumes`` the container's volumes. Any of them may be missing while the container is
    being created (a crash then leaves exactly what ``rm`` must undo).
    """

    volume: QuotaVolume | None = None
    layer: LayerState | None = None
    volumes: tuple[VolumeState, ...] = ()

    def with_layer(self, layer: LayerState | None) -> RootfsState:
        return replace(self, layer=layer)

    def to_json(self) -> dict[str, Any]:
        """The API's and the database's JSON object (flat: the layer's keys at the top)."""
        out: dict[str, Any] = {}
        if self.layer is not None:
            out.update(asdict(self.layer))
        if self.volume is not None or self.layer is not None:
            out["volume"] = self.volume.to_json() if self.volume else None
        if self.layer is not None or self.volumes:
            out["volumes"] = [v.to_json() for v in self.volumes]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RootfsState:
        d = data or {}
        layer = None
        if "merged" in d and "kind" in d:
            layer = LayerState(
                kind=str(d["kind"]),
                image=str(d["image"]),
                generation=int(d.get("generation", 0)),
                lower_mountpoint=str(d["lower_mountpoint"]),
                lower=str(d["lower"]),
                upper=str(d["upper"]),
                work=str(d["work"]),
                merged=str(d["merged"]),
            )
        return cls(
            volume=QuotaVolume.from_json(d.get("volume")),
            layer=layer,
            volumes=tuple(VolumeState.from_json(v) for v in d.get("volumes") or ()),
        )


def lower_mountpoint(images_dir: Path, image: str) -> Path:
    """Where an image's read-only tree is mounted, shared by all containers using it."""
    key = hashlib.sha256(str(Path(image).resolve()).encode()).hexdigest()[:16]
    return images_dir / key


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    return overlay_mount(str(lower), str(upper), str(work), "").options[0]


def plan_layer(
    cdir: Path, image: str, volume: QuotaVolume | None, lower_mp: Path, generation: int = 0
) -> LayerState:
    """Generation ``generation`` of the container's root: an overlay at ``cdir/rootfs`` over
    the image's lower at ``lower_mp`` (shared), upper and work on the quota volume if any."""
    provider = provider_for(image)
    base = Path(volume.mountpoint) if volume else cdir / "layer"
    lower = provider.lower_dir(image, lower_mp)
    return LayerState(
        kind=provider.kind,
        image=str(Path(image).resolve()),
        generation=generation,
        lower_mountpoint=str(lower_mp),
        lower=str(lower),
        upper=str(base / f"upper.{generation}"),
        work=str(base / f"work.{generation}"),
        merged=str(cdir / "rootfs"),
    )


def make_layer_dirs(layer: LayerState) -> None:
    """The overlay's upper and work directories (the rootfs side's part, as a snapshotter's)."""
    for d in (layer.upper, layer.work):
        Path(d).mkdir(parents=True, exist_ok=True)


def drop_layer_dirs(layer: LayerState) -> None:
    """Delete one generation's writable layer (after an upgrade, or a rolled-back one)."""
    import shutil

    for d in (layer.upper, layer.work):
        shutil.rmtree(d, ignore_errors=True)
