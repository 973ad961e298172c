"""Disk quota volumes: a sparse file formatted ext4 with a fixed inode count, loop-mounted.

Why a volume per container rather than project quotas on a shared filesystem: the size of the
filesystem *is* the byte quota and ``mkfs.ext4 -N`` fixes the inode table, so both bytes and
inodes are limited by the kernel with no quota tooling, on any host filesystem (project quotas
need ext4/xfs mounted with prjquota, which a node's data disk often is not). A full volume
gives ENOSPC to that container only; the host and other containers are unaffected. The file
is sparse, so unused quota costs no disk. ``mount -o loop`` sets the loop device's autoclear
flag: unmounting frees the loop device, so none can be orphaned by a crash between steps.

This module computes; the :class:`~tidal.engine.mounter.Mounter` formats and mounts. The
mkfs arguments come from :func:`tidal.blockdev.ext4.mkfs_command`, the one place that knows
mkfs.ext4, with the quota's inode count and a journal (a container's data is written here).
The engine formats one template per shape and copies it (:class:`VolumeTemplates`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

from tidal.blockdev.ext4 import Ext4Format, mkfs_command
from tidal.engine.mounter import Mounter
from tidal.engine.state import QuotaVolume
from tidal.fsutil import copy_sparse

MIN_INODES = 64
"""Below this an ext4 volume cannot even hold overlayfs's work directory comfortably."""


def mkfs_argv(image_path: str, size_bytes: int, inodes: int) -> list[str]:
    """mkfs.ext4 for a quota volume: no reserved blocks (the quota is all the user's),
    a fixed inode count, lazy init so formatting writes metadata only."""
    fmt = Ext4Format(inode_count=max(inodes, MIN_INODES), journal=True, label="tidal-quota")
    return [*mkfs_command(image_path, fmt), str(size_bytes // 1024) + "k"]


def format_volume_file(
    mounter: Mounter,
    image_path: Path,
    size_bytes: int,
    inodes: int,
    templates: VolumeTemplates | None = None,
) -> None:
    """A sparse file of ``size_bytes`` formatted ext4 (removed again if formatting fails):
    a copy of the shape's template when ``templates`` is given, else mkfs'ed in place."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    if templates is not None:
        templates.copy_to(image_path, size_bytes, inodes)
        return
    with open(image_path, "wb") as fh:
        fh.truncate(size_bytes)
    try:
        mounter.mkfs_ext4(image_path, mkfs_argv(str(image_path), size_bytes, inodes))
    except BaseException:
        with contextlib.suppress(OSError):
            image_path.unlink()
        raise


class VolumeTemplates:
    """One freshly formatted volume per shape, copied (its data only) for each new volume.

    Why: ``mkfs.ext4`` of a file scans the whole mount table to check that the file is not
    mounted, and with hundreds of instances on a node that scan made it 6 % of the node's CPU
    in a burst of creates; a copy of the few hundred KiB a fresh filesystem holds (4 MiB for
    10 GiB) is one ``copy_file_range`` per extent, in the kernel, with no process. The
    template is keyed by the mkfs arguments (so a changed format makes a new one) and
    published by rename. Every copy has the template's filesystem UUID (as it has its
    label): ext4 does not mind two mounted filesystems sharing one, and nothing in Tidal
    finds a volume by UUID."""

    def __init__(self, directory: Path, mounter: Mounter) -> None:
        self.directory = directory
        self.mounter = mounter
        self._lock = threading.Lock()

    def path(self, size_bytes: int, inodes: int) -> Path:
        argv = mkfs_argv("-", size_bytes, inodes)
        key = hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]
        return self.directory / f"{size_bytes}-{inodes}-{key}.img"

    def ensure(self, size_bytes: int, inodes: int) -> Path:
        """The shape's template, formatted now if there is none yet."""
        tpl = self.path(size_bytes, inodes)
        if tpl.is_file():
            return tpl
        with self._lock:
            if not tpl.is_file():
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = tpl.with_name(f"{tpl.stem}.{os.urandom(4).hex()}.tmp")
                format_volume_file(self.mounter, tmp, size_bytes, inodes)
                os.rename(tmp, tpl)
        return tpl

    def copy_to(self, image_path: Path, size_bytes: int, inodes: int) -> None:
        tpl = self.ensure(size_bytes, inodes)
        try:
            copy_sparse(tpl, image_path)
        except BaseException:
            with contextlib.suppress(OSError):
                image_path.unlink()
            raise


def create_volume(
    mounter: Mounter,
    image_path: Path,
    mountpoint: Path,
    size_bytes: int,
    inodes: int,
    templates: VolumeTemplates | None = None,
) -> QuotaVolume:
    """Make and mount a new quota volume (undoing its own steps on failure)."""
    format_volume_file(mounter, image_path, size_bytes, inodes, templates)
    return _mount_volume(mounter, image_path, mountpoint, size_bytes, inodes)


def _mount_volume(
    mounter: Mounter, image_path: Path, mountpoint: Path, size_bytes: int, inodes: int
) -> QuotaVolume:
    """Mount a formatted volume file; the file is deleted if the mount fails."""
    vol = QuotaVolume(str(image_path), str(mountpoint), size_bytes, inodes)
    try:
        mounter.apply([vol.mount])
    except BaseException:
        with contextlib.suppress(OSError):
            image_path.unlink()
        raise
    return vol


def destroy_volume(mounter: Mounter, vol: QuotaVolume) -> None:
    """Unmount (which frees the autoclear loop device) and delete the backing file."""
    mounter.unmount(vol.mount)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vol.image_path)


def volume_usage(vol: QuotaVolume) -> dict[str, int]:
    """Bytes and inodes used/total of a mounted volume, for ``inspect``."""
    st = os.statvfs(vol.mountpoint)
    return {
        "bytes_total": st.f_blocks * st.f_frsize,
        "bytes_free": st.f_bavail * st.f_frsize,
        "inodes_total": st.f_files,
        "inodes_free": st.f_favail,
    }


class VolumePool:
    """Pre-formatted quota volumes of the default shape ("storage pre-warming").

    ``mkfs.ext4`` is a large share of a container's start; the pool keeps a few volumes of
    the engine's default size and inode count formatted ahead of time, so a start only
    renames one into place and mounts it. Files are published atomically (write ``.tmp``,
    rename) and taken by rename, so concurrent takers never share one.
    """

    def __init__(
        self,
        directory: Path,
        size_bytes: int,
        inodes: int,
        target: int,
        mounter: Mounter | None = None,
    ) -> None:
        self.directory = directory / f"{size_bytes}-{inodes}"
        self.size_bytes = size_bytes
        self.inodes = inodes
        self.target = target
        if mounter is None:
            from tidal.engine.mounter import HostMounter

            mounter = HostMounter()
        self.mounter = mounter
        self.templates = VolumeTemplates(directory / "templates", mounter)

    def matches(self, size_bytes: int, inodes: int) -> bool:
        return self.target > 0 and (size_bytes, inodes) == (self.size_bytes, self.inodes)

    def ready(self) -> list[Path]:
        try:
            return sorted(self.directory.glob("*.img"))
        except OSError:
            return []

    def take(self, dest: Path) -> bool:
        """Move a ready volume to ``dest``; False when the pool is empty."""
        for path in self.ready():
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                continue  # another taker won it
            return True
        return False

    def refill(self) -> int:
        """Format volumes until ``target`` are ready; returns how many were made."""
        made = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        while len(self.ready()) < self.target:
            tmp = self.directory / f"{os.urandom(8).hex()}.tmp"
            format_volume_file(self.mounter, tmp, self.size_bytes, self.inodes, self.templates)
            os.rename(tmp, tmp.with_suffix(".img"))
            made += 1
        return made


def volume_from_pool_or_new(
    mounter: Mounter,
    pool: VolumePool | None,
    image_path: Path,
    mountpoint: Path,
    size_bytes: int,
    inodes: int,
) -> QuotaVolume:
    """A mounted quota volume, taken from ``pool`` when it has one of this shape."""
    if pool is not None and pool.matches(size_bytes, inodes):
        image_path.parent.mkdir(parents=True, exist_ok=True)
        if pool.take(image_path):
            return _mount_volume(mounter, image_path, mountpoint, size_bytes, inodes)
    templates = pool.templates if pool is not None else None
    return create_volume(mounter, image_path, mountpoint, size_bytes, inodes, templates)
