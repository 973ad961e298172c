"""A container's storage on the host: quota volume, root layer, volumes; made, kept, undone.

The rootfs side (:mod:`tidal.engine.rootfs`, :mod:`tidal.engine.volume`) computes plans as
data; :class:`Storage` decides what a container needs, records each step through a callback
the moment it is done (so a failure in a later step, or a SIGKILL, leaves a
:class:`~tidal.engine.rootfs.RootfsState` that :meth:`Storage.destroy` can undo), and has the
engine's one :class:`~tidal.engine.mounter.Mounter` execute the plans. Image mounts are shared:
one per image for all its containers, counted from the state database so that the count
survives restarts. When the last user goes, the mount stays *hot* (the node's image cache: the
next container of that image starts without mounting anything) until more than
``hot_images`` are idle (least recently used first), it is idle for ``hot_image_idle_s``, or
the engine closes. Whether a hot mount is still unused is decided from the database at the
moment it is released, so a container created meanwhile keeps it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tidal.engine.mounter import Mounter, sweep
from tidal.engine.rootfs import (
    TidalImageRootfsProvider,
    drop_layer_dirs,
    layer_plan,
    lower_mountpoint,
    lower_mounts,
    make_layer_dirs,
    plan_layer,
)
from tidal.engine.spec import ContainerSpec, QuotaSpec
from tidal.engine.state import TIDAL_IMAGE, LayerState, Mount, QuotaVolume, RootfsState, VolumeState
from tidal.engine.store import Store
from tidal.engine.volume import (
    VolumePool,
    create_volume,
    destroy_volume,
    volume_from_pool_or_new,
)
from tidal.errors import ConfigError, TidalError
from tidal.image.manifest import EXACT_ROOT_ANNOTATION, Image

log = logging.getLogger(__name__)
Record = Callable[[RootfsState], None]


class Storage:
    """Storage set-up and teardown for the containers of one engine state directory."""

    def __init__(
        self,
        store: Store,
        mounter: Mounter,
        images_dir: Path,
        pool: VolumePool,
        bytes_per_inode: int,
        *,
        hot_images: int = 0,
        hot_image_idle_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.mounter = mounter
        self.images_dir = images_dir
        self.pool = pool
        self.bytes_per_inode = bytes_per_inode
        self.hot_images = hot_images
        self.hot_image_idle_s = hot_image_idle_s
        self._clock = clock
        self._image_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._idle: dict[str, tuple[tuple[Mount, ...], float]] = {}
        """Hot image mounts no container uses: lower mount point -> (its mounts, idle since)."""

    def _image_lock(self, mountpoint: str) -> threading.Lock:
        """Serialises mounting and releasing one shared image mount."""
        with self._guard:
            return self._image_locks.setdefault(mountpoint, threading.Lock())

    # --- making --------------------------------------------------------------------------------

    def prepare(
        self,
        cid: str,
        cdir: Path,
        spec: ContainerSpec,
        root_quota: QuotaSpec | None,
        record: Record,
    ) -> RootfsState:
        """Quota volume, root layer, volumes; ``record`` is called after each step."""
        state = RootfsState()
        if root_quota is not None:
            inodes = root_quota.inodes or root_quota.size_bytes // self.bytes_per_inode
            vol = volume_from_pool_or_new(
                self.mounter,
                self.pool,
                cdir / "disk.img",
                cdir / "disk",
                root_quota.size_bytes,
                inodes,
            )
            state = RootfsState(volume=vol)
            record(state)
        layer = self.mount_layer(
            cid, cdir, spec.image, state.volume, 0, readonly=spec.read_only_rootfs
        )
        state = state.with_layer(layer)
        record(state)
        quotas = {q.target: q for q in spec.disk_quotas}
        volumes: list[VolumeState] = []
        for i, vol_spec in enumerate(spec.volumes):
            if vol_spec.source is not None:
                if not Path(vol_spec.source).exists():
                    raise ConfigError(
                        f"volume source {vol_spec.source} does not exist on this host"
                    )
                entry = VolumeState(vol_spec.target, vol_spec.source, vol_spec.source)
            else:
                path = cdir / "volumes" / str(i)
                q = quotas.get(vol_spec.target)
                qv: QuotaVolume | None = None
                if q is not None:
                    qv = create_volume(
                        self.mounter,
                        cdir / "volumes" / f"{i}.img",
                        path,
                        q.size_bytes,
                        q.inodes or q.size_bytes // self.bytes_per_inode,
                        self.pool.templates,
                    )
                else:
                    path.mkdir(parents=True, exist_ok=True)
                entry = VolumeState(vol_spec.target, None, str(path), qv)
            volumes.append(entry)
            state = RootfsState(state.volume, state.layer, tuple(volumes))
            record(state)
        return state

    def mount_layer(
        self,
        cid: str,
        cdir: Path,
        image: str,
        volume: QuotaVolume | None,
        generation: int,
        *,
        readonly: bool = False,
    ) -> LayerState:
        """Mount generation ``generation`` of the root over the image's shared lower
        (``readonly``: the lower only, see :func:`~tidal.engine.rootfs.plan_layer`)."""
        mp = lower_mountpoint(self.images_dir, image)
        layer = plan_layer(cdir, image, volume, mp, generation, readonly=readonly)
        make_layer_dirs(layer)
        hide_mkfs_lost_found(layer)
        with self._image_lock(layer.lower_mountpoint):
            with self._guard:
                self._idle.pop(layer.lower_mountpoint, None)  # in use again
            self.mounter.apply(layer_plan(layer))
        return layer

    def ensure(self, state: RootfsState) -> None:
        """Remount what a host reboot or a lost mount took; a no-op when all is in place."""
        plan: list[Mount] = []
        if state.volume is not None:
            plan.append(state.volume.mount)
        if state.layer is not None:
            make_layer_dirs(state.layer)
            with self._image_lock(state.layer.lower_mountpoint):
                self.mounter.apply([*plan, *layer_plan(state.layer)])
            plan = []
        plan += [v.volume.mount for v in state.volumes if v.volume is not None]
        self.mounter.apply(plan)

    # --- undoing -------------------------------------------------------------------------------

    def unmount_layer(self, layer: LayerState, *, drop: bool = False) -> None:
        """Unmount the overlay (the image stays for others); ``drop`` also deletes its layer."""
        if layer.readonly:
            return  # no overlay: the lower is the image's, released with it
        self.mounter.unmount(layer.overlay)
        if drop:
            drop_layer_dirs(layer)

    def _users(self, mountpoint: str, except_id: str | None = None) -> bool:
        return any(
            other.id != except_id
            and other.rootfs.layer is not None
            and other.rootfs.layer.lower_mountpoint == mountpoint
            for other in self.store.list()
        )

    def release_lower_if_unused(self, layer: LayerState, except_id: str | None) -> None:
        """The last container of an image went: keep its mount hot, or release it."""
        mounts = lower_mounts(layer)
        if not mounts:
            return
        with self._image_lock(layer.lower_mountpoint):
            if self._users(layer.lower_mountpoint, except_id):
                return
            if self.hot_images > 0:
                with self._guard:
                    self._idle[layer.lower_mountpoint] = (mounts, self._clock())
            else:
                self._release(layer.lower_mountpoint, mounts)
        self.trim_hot_images()

    def _release(self, mountpoint: str, mounts: tuple[Mount, ...]) -> None:
        """Unmount an unused image mount (the caller holds its image lock)."""
        self.mounter.release(mounts)
        try:
            Path(mountpoint).rmdir()
        except OSError as exc:
            log.warning("image mount point %s stays: %s", mountpoint, exc)

    def hot_image_mounts(self) -> list[str]:
        """The hot image mounts that no container uses, least recently used first."""
        with self._guard:
            return sorted(self._idle, key=lambda mp: self._idle[mp][1])

    def trim_hot_images(self, *, keep: int | None = None) -> list[str]:
        """Release hot mounts beyond ``keep`` (default ``hot_images``), least recently used
        first, and those idle for longer than ``hot_image_idle_s``; returns the released."""
        keep = self.hot_images if keep is None else keep
        now = self._clock()
        order = self.hot_image_mounts()
        released = []
        for i, mp in enumerate(order):
            with self._guard:
                entry = self._idle.get(mp)
            if entry is None:
                continue
            mounts, since = entry
            expired = self.hot_image_idle_s > 0 and now - since > self.hot_image_idle_s
            if i >= len(order) - keep and not expired:
                continue
            with self._image_lock(mp):
                with self._guard:
                    if self._idle.get(mp) is not entry:  # a container took it meanwhile
                        continue
                    del self._idle[mp]
                if self._users(mp):
                    continue
                try:
                    self._release(mp, mounts)
                except TidalError as exc:
                    log.warning("hot image mount %s could not be released: %s", mp, exc)
                    continue
            released.append(mp)
        return released

    def destroy(self, cid: str, cdir: Path, state: RootfsState) -> list[str]:
        """Undo everything ``state`` records, then anything still mounted under ``cdir``.

        Each step is tried even when an earlier one failed; returns what failed, one line each.
        """
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except (TidalError, OSError) as exc:
                log.warning("removing container %s: %s: %s", cid[:12], what, exc)
                errors.append(f"{what}: {exc}")

        for v in state.volumes:
            if v.volume is not None:
                vol = v.volume
                attempt("volume", lambda vol=vol: destroy_volume(self.mounter, vol))  # type: ignore[misc]
        layer = state.layer
        if layer is not None:
            attempt("rootfs", lambda: self.unmount_layer(layer))
            attempt("image", lambda: self.release_lower_if_unused(layer, cid))
        if state.volume is not None:
            vol0 = state.volume
            attempt("rootfs volume", lambda: destroy_volume(self.mounter, vol0))
        # A crash between making a mount and recording it leaves one the state does not name.
        left = sweep(self.mounter, cdir)
        if left:
            errors.append(f"still mounted: {', '.join(left)}")
        return errors

    def release_unused_images(self) -> list[str]:
        """On start: image mounts no container records (hot ones of the engine before, or one
        a daemon killed mid-create made) are kept hot up to ``hot_images``, most recently
        mounted first; the rest are unmounted. Returns the unmounted."""
        used = {
            r.rootfs.layer.lower_mountpoint for r in self.store.list() if r.rootfs.layer is not None
        }
        try:
            candidates = sorted(
                (p for p in self.images_dir.iterdir() if p.is_dir()),
                key=lambda p: p.stat().st_mtime,  # the mount point's: when it was made
                reverse=True,
            )
        except FileNotFoundError:
            return []
        kept = 0
        released = []
        for mp in candidates:
            if str(mp) in used or str(mp) in self._idle or not self.mounter.mounted(str(mp)):
                continue
            mounts = (Mount(TIDAL_IMAGE, "", str(mp), shared=True),)
            if kept < self.hot_images:
                with self._guard:
                    self._idle[str(mp)] = (mounts, self._clock())
                kept += 1
                log.info("image mount %s kept hot (no container uses it)", mp)
                continue
            with self._image_lock(str(mp)):
                try:
                    self._release(str(mp), mounts)
                except (TidalError, OSError) as exc:
                    log.warning("unused image mount %s could not be released: %s", mp, exc)
                    continue
            log.warning("released image mount %s, which no container records", mp)
            released.append(str(mp))
        return released


OVERLAY_WHITEOUT_DEV = 0
"""overlayfs hides a lower entry behind a character device 0:0 of the same name in upper."""


def hide_mkfs_lost_found(layer: LayerState) -> None:
    """A container's root is exactly its image's tree: a Tidal image built before its
    builder removed mkfs's ``/lost+found`` (no :data:`EXACT_ROOT_ANNOTATION`) still has one,
    so the writable layer gets a whiteout for it. Decided from the manifest, because the
    upper must be ready before the lower is mounted (one mount plan)."""
    if layer.kind != TidalImageRootfsProvider.kind or layer.readonly:
        return
    if Image.open(Path(layer.image)).manifest.annotations.get(EXACT_ROOT_ANNOTATION) == "true":
        return
    whiteout = Path(layer.upper) / "lost+found"
    if not whiteout.exists() and not whiteout.is_symlink():
        os.mknod(whiteout, stat.S_IFCHR | 0o000, os.makedev(OVERLAY_WHITEOUT_DEV, 0))
