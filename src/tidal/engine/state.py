"""The engine's recorded state and mount plans as plain frozen data, with no dependency.

What a container holds on the host (:class:`RootfsState`: its quota volume, overlay layer
generation and volumes) and the :class:`Mount` values that describe it are read on every
``tidal ps``/``inspect`` through :class:`~tidal.engine.store.ContainerRecord`. They live here,
apart from the code that plans (:mod:`tidal.engine.rootfs`, :mod:`tidal.engine.volume`) and
executes (:mod:`tidal.engine.mounter`) them, so that a client reading records loads no planner,
no ext4 formatter and no tool runner (each ``tidal`` command is a fresh process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

OVERLAY = "overlay"
EXT4_LOOP = "ext4-loop"
"""An ext4 file system in a regular file, mounted through an autoclear loop device."""
TIDAL_IMAGE = "tidal-image"
"""A Tidal block image served lazily (FUSE -> loop -> ext4), read-only."""
MOUNT_TYPES = (OVERLAY, EXT4_LOOP, TIDAL_IMAGE)


@dataclass(frozen=True)
class Mount:
    """One mount to make: ``source`` of ``type`` at ``target`` with ``options``."""

    type: str
    source: str
    target: str
    options: tuple[str, ...] = ()
    shared: bool = False
    """Used by several containers (an image's lower): an existing mount at ``target`` is reused."""


def overlay_mount(lower: str, upper: str, work: str, target: str) -> Mount:
    return Mount(OVERLAY, OVERLAY, target, (f"lowerdir={lower},upperdir={upper},workdir={work}",))


@dataclass(frozen=True)
class QuotaVolume:
    """A quota volume: ``image_path`` (sparse file) mounted at ``mountpoint``."""

    image_path: str
    mountpoint: str
    size_bytes: int
    inodes: int

    @property
    def mount(self) -> Mount:
        return Mount(EXT4_LOOP, self.image_path, self.mountpoint, ("noatime",))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> QuotaVolume | None:
        return None if not data else cls(**data)


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
    readonly: bool = False
    """No writable layer and no overlay: the root is the image's lower itself, mounted
    read-only by the runtime (``merged == lower``; ``upper`` and ``work`` are empty)."""

    @property
    def overlay(self) -> Mount:
        if self.readonly:
            raise ValueError(f"read-only root {self.merged} has no overlay")
        return overlay_mount(self.lower, self.upper, self.work, self.merged)


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
                readonly=bool(d.get("readonly", False)),
            )
        return cls(
            volume=QuotaVolume.from_json(d.get("volume")),
            layer=layer,
            volumes=tuple(VolumeState.from_json(v) for v in d.get("volumes") or ()),
        )
