"""The snapshotter itself: containerd's verbs over the metadata store, the snapshot
directories and (for Tidal images) the image backend. The gRPC adapter (:mod:`.service`)
only translates messages and errors.

Layout under ``root``::

    metadata.db               the rows (tidal.snapshotter.store)
    snapshots/<id>/fs         an active snapshot's upper dir (or a bind mount's source);
                              after Commit, a lower dir of its children
    snapshots/<id>/work       overlayfs's work dir
    images/<manifest hex>/    where a Tidal image is mounted read-only, once for all the
                              active snapshots and views on it (the overlays' shared lowerdir);
                              unmounted when the last of them is removed or committed
    lock                      flock held by the one server on this root

Ordinary layers work as in containerd's overlayfs snapshotter: containerd applies each tar
into the mounts of a Prepare and commits it. A Prepare whose labels name a Tidal layer
(:func:`~tidal.snapshotter.model.remote_layer`) pulls the image's metadata, records a
committed snapshot under the target name and answers "already exists", so containerd never
downloads the layer; the image is mounted only when a container's snapshot is prepared on it.

Crash safety: rows are written before the effect they describe (a mount's row carries
``mount_state = 'mounting'`` before the mount starts), directories are created before their row
commits and removed after it is deleted; :meth:`reconcile` (at start) remounts what rows say
should be mounted, and :meth:`cleanup` removes directories and mounts no row claims.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tidal.blockdev import ext4
from tidal.errors import (
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
    TidalError,
)
from tidal.snapshotter.backend import ImageBackend
from tidal.snapshotter.model import (
    KIND_NAMES,
    SNAPSHOT_REF_LABEL,
    Kind,
    Mount,
    RemoteImage,
    Snapshot,
    lower_chain,
    matches,
    parse_filter,
    plan_mounts,
    remote_layer,
    unreferenced_tidal_layer,
    updated_labels,
    validate_labels,
)
from tidal.snapshotter.store import MetaStore

log = logging.getLogger(__name__)

MOUNTING = "mounting"
MOUNTED = "mounted"


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under ``path``, hard links counted once (as ``du``)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    paths = [str(path)]
    for dirpath, dirnames, filenames in os.walk(path):
        paths.extend(os.path.join(dirpath, n) for n in (*dirnames, *filenames))
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return size, len(seen)


class Snapshotter:
    """containerd's ``snapshots.Snapshotter`` (with ``Cleaner``) over a root directory."""

    def __init__(self, root: Path, backend: ImageBackend | None = None) -> None:
        self.root = root.resolve()
        self.backend = backend
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self.meta = MetaStore(self.root / "metadata.db")
        self._lock = threading.RLock()
        self._image_locks: dict[str, threading.Lock] = {}

    def close(self) -> None:
        self.meta.close()

    # --- paths --------------------------------------------------------------------------------

    def snapshot_dir(self, snap: Snapshot | int) -> Path:
        rid = snap if isinstance(snap, int) else snap.id
        return self.root / "snapshots" / str(rid)

    def image_target(self, image: RemoteImage) -> Path:
        return self.root / "images" / image.manifest_digest.partition(":")[2]

    def _image_of(self, key: str) -> RemoteImage | None:
        return lower_chain(self.meta.ancestors(key))[1]

    def _users(self, image: RemoteImage) -> list[str]:
        """Keys of the snapshots whose rows need ``image`` mounted (or are mounting it)."""
        users = []
        for snap in self.meta.all():
            if snap.kind != Kind.COMMITTED and self.meta.mount_state(snap.key) is not None:
                mine = self._image_of(snap.key)
                if mine is not None and mine.manifest_digest == image.manifest_digest:
                    users.append(snap.key)
        return users

    def _image_lock(self, image: RemoteImage) -> threading.Lock:
        with self._lock:
            return self._image_locks.setdefault(image.manifest_digest, threading.Lock())

    # --- queries ------------------------------------------------------------------------------

    def stat(self, key: str) -> Snapshot:
        with self._lock:
            return self.meta.get(key)

    def walk(self, filters: Sequence[str] = ()) -> list[Snapshot]:
        parsed = [parse_filter(f) for f in filters if f.strip()]
        with self._lock:
            return [s for s in self.meta.all() if matches(s, parsed)]

    def usage(self, key: str) -> tuple[int, int]:
        with self._lock:
            snap = self.meta.get(key)
            if snap.kind == Kind.ACTIVE:
                return disk_usage(self.snapshot_dir(snap) / "fs")
            return snap.size_bytes, snap.inodes

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            snap = self.meta.get(key)
            if snap.kind == Kind.COMMITTED:
                raise SnapshotStateError(
                    f"snapshot {key!r} is committed; only active snapshots and views have mounts"
                )
            return self._plan(snap)

    def _plan(self, snap: Snapshot) -> list[Mount]:
        stack, image = lower_chain(self.meta.ancestors(snap.key))
        lowers = [str(self.snapshot_dir(s) / "fs") for s in stack]
        if image is not None:
            lowers.append(str(self.image_target(image)))
        d = self.snapshot_dir(snap)
        return plan_mounts(snap.kind, fs_dir=str(d / "fs"), work_dir=str(d / "work"), lowers=lowers)

    # --- creating -----------------------------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, validate_labels(labels or {}))

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, validate_labels(labels or {}))

    def _check_new(self, key: str, parent: str) -> None:
        if self.meta.find(key) is not None:
            raise SnapshotExistsError(f"snapshot {key!r} already exists")
        if parent:
            p = self.meta.find(parent)
            if p is None:
                raise SnapshotNotFoundError(f"parent snapshot {parent!r} does not exist")
            if p.kind != Kind.COMMITTED:
                raise SnapshotStateError(
                    f"parent {parent!r} is {KIND_NAMES.get(p.kind, '?')}, not committed; "
                    "commit it before preparing on it"
                )

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """The lock covers the metadata only: pulling an image's metadata and mounting it
        (a second or more) run outside it, so other calls are not held up meanwhile."""
        if not key:
            raise SnapshotError("a snapshot needs a key")
        with self._lock:
            self._check_new(key, parent)
        if kind == Kind.ACTIVE and unreferenced_tidal_layer(labels):
            raise SnapshotStateError(
                f"layer {labels[SNAPSHOT_REF_LABEL]} is a Tidal block layer, which containerd "
                "cannot unpack; pull the image lazily with `ctr-remote images rpull "
                "--snapshotter tidal REF` (or through the CRI plugin with "
                "disable_snapshot_annotations = false)"
            )
        layer = remote_layer(labels) if kind == Kind.ACTIVE else None
        if layer is not None and self.backend is not None:
            self._remote(layer.target, layer.image_ref, layer.layer_digest, parent, labels)
        with self._lock:
            self._check_new(key, parent)
            chain = [self.meta.get(parent), *self.meta.ancestors(parent)] if parent else []
            _, image = lower_chain(chain)
            with self.meta.tx():
                snap = self.meta.insert(
                    key, parent, kind, labels, mount_state=MOUNTING if image else None
                )
                d = self.snapshot_dir(snap)
                if d.exists():  # an orphan of a crash before its row committed
                    shutil.rmtree(d)
                (d / "fs").mkdir(parents=True)
                if kind == Kind.ACTIVE:
                    (d / "work").mkdir()
        if image is not None:
            try:
                self._mount_image(snap, image)
            except BaseException:
                with self._lock:
                    self._unmount_image(snap)
                    self._drop(snap)
                raise
        with self._lock:
            return self._plan(snap)

    def _remote(
        self, target: str, ref: str, layer_digest: str, parent: str, labels: dict[str, str]
    ) -> None:
        """Record the committed snapshot of a Tidal layer and raise "already exists", or return
        (having logged why) when the layer turns out not to be one the image has."""
        assert self.backend is not None
        with self._lock:
            if self.meta.find(target) is not None:
                raise SnapshotExistsError(f"target snapshot {target!r} already exists")
        try:
            pulled = self.backend.pull(ref)
        except TidalError as exc:
            raise SnapshotError(
                f"layer {layer_digest} of {ref} is marked as a Tidal layer but its image could "
                f"not be pulled: {exc}"
            ) from exc
        if layer_digest not in pulled.layer_digests:
            log.warning(
                "layer %s is not in Tidal image %s (%s); applying it as an ordinary layer",
                layer_digest,
                ref,
                pulled.manifest_digest,
            )
            return
        remote = RemoteImage(ref, pulled.manifest_digest, layer_digest)
        with self._lock:
            self.meta.insert(target, parent, Kind.COMMITTED, labels, remote=remote)
        log.info("layer %s of %s: remote snapshot %s (not downloaded)", layer_digest, ref, target)
        raise SnapshotExistsError(
            f"target snapshot {target!r} exists: layer {layer_digest} is served lazily by Tidal"
        )

    def _mount_image(self, snap: Snapshot, image: RemoteImage) -> None:
        """Intent (``mounting`` in the row), then the mount unless another snapshot's is there
        already, then the record (``mounted``)."""
        if self.backend is None:
            raise SnapshotError(
                f"snapshot {snap.key!r} sits on Tidal image {image.reference}, but this "
                "snapshotter has no image backend"
            )
        target = self.image_target(image)
        with self._lock:
            self.meta.set_mount_state(snap.key, MOUNTING)
        with self._image_lock(image):
            if not self.backend.is_mounted(target):
                if ext4.is_mountpoint(target):  # a dead server's leftovers
                    with contextlib.suppress(TidalError):
                        self.backend.unmount(target)
                target.mkdir(parents=True, exist_ok=True)
                self.backend.mount(image, target)
        with self._lock:
            self.meta.set_mount_state(snap.key, MOUNTED)

    def _release_image(self, image: RemoteImage | None) -> None:
        """Unmount ``image`` if no row needs it any more (called with the lock held)."""
        if image is None or self.backend is None or self._users(image):
            return
        target = self.image_target(image)
        with self._image_lock(image):
            if ext4.is_mountpoint(target) or self.backend.is_mounted(target):
                self.backend.unmount(target)
            with contextlib.suppress(OSError):
                target.rmdir()

    # --- commit, update, remove ---------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> Snapshot:
        given = validate_labels(labels or {})
        with self._lock:
            snap = self.meta.get(key)
            if snap.kind != Kind.ACTIVE:
                raise SnapshotStateError(
                    f"snapshot {key!r} is {KIND_NAMES.get(snap.kind, '?')}; only an active "
                    "snapshot can be committed"
                )
            if self.meta.find(name) is not None:
                raise SnapshotExistsError(f"snapshot {name!r} already exists")
            size, inodes = disk_usage(self.snapshot_dir(snap) / "fs")
            image = self._image_of(key)
            done = self.meta.commit(key, name, given, size, inodes)  # clears its mount state
            self._release_image(image)
            shutil.rmtree(self.snapshot_dir(snap) / "work", ignore_errors=True)
            return done

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        with self._lock:
            snap = self.meta.get(key)
            return self.meta.set_labels(key, updated_labels(snap.labels, labels, fieldpaths))

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self.meta.get(key)
            n = self.meta.children(key)
            if n:
                raise SnapshotStateError(
                    f"snapshot {key!r} has {n} child snapshot(s); remove them first"
                )
            self._unmount_image(snap)
            self._drop(snap)

    def _drop(self, snap: Snapshot) -> None:
        self.meta.delete(snap.key)
        d = self.snapshot_dir(snap)
        if d.exists():
            self._remove_dir(d)

    def _unmount_image(self, snap: Snapshot) -> None:
        """``snap`` no longer needs its image: clear its row's mount state, and unmount the
        image if it was the last user (called with the lock held)."""
        if self.meta.find(snap.key) is None or snap.kind == Kind.COMMITTED:
            return
        image = self._image_of(snap.key)
        self.meta.set_mount_state(snap.key, None)
        self._release_image(image)

    def _remove_dir(self, d: Path) -> None:
        inside = [m for m in ext4.mount_points() if m.startswith(f"{d}/")]
        if inside:
            raise SnapshotError(f"{inside[0]} is still mounted; not removing {d}")
        shutil.rmtree(d)

    # --- start and clean-up -------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """At start: remount each image that rows say is (or was being) mounted but whose
        mount is gone. Returns the keys of the snapshots whose image was remounted."""
        done = []
        with self._lock:
            by_image: dict[str, tuple[RemoteImage, list[str]]] = {}
            for snap in self.meta.all():
                if snap.kind == Kind.COMMITTED or self.meta.mount_state(snap.key) is None:
                    continue
                image = self._image_of(snap.key)
                if image is None:
                    self.meta.set_mount_state(snap.key, None)
                    continue
                by_image.setdefault(image.manifest_digest, (image, []))[1].append(snap.key)
            for image, keys in by_image.values():
                if self.backend is not None and self.backend.is_mounted(self.image_target(image)):
                    continue
                log.warning("remounting Tidal image %s for %s", image.reference, ", ".join(keys))
                for key in keys:
                    self._mount_image(self.meta.get(key), image)
                done += keys
        return done

    def cleanup(self) -> list[str]:
        """containerd's ``Cleaner``: remove snapshot directories that no row claims (e.g. after
        a crash between creating a directory and recording it) and image mounts no row needs."""
        removed = []
        with self._lock:
            known = {str(s.id) for s in self.meta.all()}
            for d in sorted((self.root / "snapshots").iterdir()):
                if d.name not in known:
                    self._remove_dir(d)
                    removed.append(str(d))
            needed = set()
            for snap in self.meta.all():
                if snap.kind != Kind.COMMITTED and self.meta.mount_state(snap.key) is not None:
                    image = self._image_of(snap.key)
                    if image is not None:
                        needed.add(self.image_target(image).name)
            images = self.root / "images"
            for d in sorted(images.iterdir()) if images.is_dir() else []:
                if d.name in needed:
                    continue
                if self.backend is not None and (
                    ext4.is_mountpoint(d) or self.backend.is_mounted(d)
                ):
                    self.backend.unmount(d)
                with contextlib.suppress(OSError):
                    d.rmdir()
                    removed.append(str(d))
        return removed
