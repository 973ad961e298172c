"""Disk quota volumes: a sparse file formatted ext4 with a fixed inode count, loop-mounted.

Why a volume per container rather than project quotas on a shared filesystem: the size of the
filesystem *is* the byte quota and ``mkfs.ext4 -N`` fixes the inode table, so both bytes and
inodes are limited by the kernel with no quota tooling, on any host filesystem (project quotas
need ext4/xfs mounted with prjquota, which a node's data disk often is not). A full volume
gives ENOSPC to that container only; the host and other containers are unaffected. The file
is sparse, so unused quota costs no disk. ``mount -o loop`` sets the loop device's autoclear
flag: unmounting frees the loop device, so none can be orphaned by a crash between steps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tidal.blockdev.ext4 import is_mountpoint
from tidal.errors import QuotaError

MIN_INODES = 64
"""Below this an ext4 volume cannot even hold overlayfs's work directory comfortably."""


@dataclass(frozen=True)
class QuotaVolume:
    """A quota volume: ``image_path`` (sparse file) mounted at ``mountpoint``."""

    image_path: str
    mountpoint: str
    size_bytes: int
    inodes: int


def mkfs_argv(image_path: str, size_bytes: int, inodes: int) -> list[str]:
    """mkfs.ext4 for a quota volume: no reserved blocks (the quota is all the user's),
    a fixed inode count, lazy init so formatting writes metadata only."""
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-b",
        "4096",
        "-N",
        str(max(inodes, MIN_INODES)),
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        "-L",
        "tidal-quota",
        image_path,
        str(size_bytes // 1024) + "k",
    ]


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise QuotaError(
            f"{what}: {argv[0]} is not installed (apt-get install e2fsprogs)"
        ) from None
    if proc.returncode != 0:
        raise QuotaError(f"{what}: {(proc.stderr or proc.stdout).strip() or proc.returncode}")


def create_volume(image_path: Path, mountpoint: Path, size_bytes: int, inodes: int) -> QuotaVolume:
    """Make and mount a new quota volume (undoing its own steps on failure)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    with open(image_path, "wb") as fh:
        fh.truncate(size_bytes)
    try:
        _run(
            mkfs_argv(str(image_path), size_bytes, inodes), f"formatting quota volume {image_path}"
        )
        vol = QuotaVolume(str(image_path), str(mountpoint), size_bytes, inodes)
        mount_volume(vol)
    except BaseException:
        with contextlib.suppress(OSError):
            image_path.unlink()
        raise
    return vol


def mount_volume(vol: QuotaVolume) -> None:
    """Mount an existing volume (idempotent: an already mounted one is left alone)."""
    mp = Path(vol.mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    if is_mountpoint(mp):
        return
    _run(
        ["mount", "-t", "ext4", "-o", "loop,noatime", vol.image_path, vol.mountpoint],
        f"mounting quota volume {vol.image_path} at {vol.mountpoint}",
    )


def unmount_path(path: Path) -> None:
    """Unmount ``path`` if mounted; busy mounts are detached lazily rather than leaked."""
    if not is_mountpoint(path):
        return
    proc = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 and is_mountpoint(path):
        proc = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise QuotaError(f"cannot unmount {path}: {proc.stderr.strip()}")


def destroy_volume(vol: QuotaVolume) -> None:
    """Unmount (which frees the autoclear loop device) and delete the backing file."""
    unmount_path(Path(vol.mountpoint))
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

    def __init__(self, directory: Path, size_bytes: int, inodes: int, target: int) -> None:
        self.directory = directory / f"{size_bytes}-{inodes}"
        self.size_bytes = size_bytes
        self.inodes = inodes
        self.target = target

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
            with open(tmp, "wb") as fh:
                fh.truncate(self.size_bytes)
            try:
                _run(mkfs_argv(str(tmp), self.size_bytes, self.inodes), f"pre-formatting {tmp}")
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.rename(tmp, tmp.with_suffix(".img"))
            made += 1
        return made


def volume_from_pool_or_new(
    pool: VolumePool | None, image_path: Path, mountpoint: Path, size_bytes: int, inodes: int
) -> QuotaVolume:
    """A mounted quota volume, taken from ``pool`` when it has one of this shape."""
    if pool is not None and pool.matches(size_bytes, inodes):
        image_path.parent.mkdir(parents=True, exist_ok=True)
        if pool.take(image_path):
            vol = QuotaVolume(str(image_path), str(mountpoint), size_bytes, inodes)
            try:
                mount_volume(vol)
            except BaseException:
                with contextlib.suppress(OSError):
                    image_path.unlink()
                raise
            return vol
    return create_volume(image_path, mountpoint, size_bytes, inodes)
