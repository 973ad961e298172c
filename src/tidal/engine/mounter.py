"""The one adapter that mounts: executes the mount plans the rootfs side returns as data.

As containerd's snapshotters return ``[]mount.Mount`` and one place mounts them, Tidal's
rootfs and volume code (:mod:`tidal.engine.rootfs`, :mod:`tidal.engine.volume`) only computes
:class:`Mount` values; a :class:`Mounter` carries them out. :class:`HostMounter` is the real
one (overlays and loop-mounted quota volumes by mount(2) and umount2(2), ``mkfs.ext4``
through :func:`tidal.proc.run`, Tidal block images through the node service when it runs,
else :mod:`tidal.blockdev.mounts`); :class:`tidal.testing.engine.FakeMounter` records the
same plans under a temp directory so that the engine's lifecycle is testable without root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tidal import proc
from tidal.blockdev import ext4
from tidal.engine import mountview
from tidal.engine.state import EXT4_LOOP, OVERLAY, TIDAL_IMAGE, Mount
from tidal.errors import EngineError, QuotaError, TidalError

log = logging.getLogger(__name__)

SWEEP_DEPTH = 2
"""How deep below a container's directory the engine mounts (``rootfs``, ``disk``,
``volumes/N``): the sweep looks that deep, a statx per directory, instead of reading the
whole mount table on every remove."""


class Mounter(ABC):
    """Executes mount plans; the only code that mounts, unmounts or formats for the engine in
    the host's namespace (the monitor's short-lived runtime view is :mod:`tidal.engine.mountview`)."""

    @abstractmethod
    def _mount(self, m: Mount) -> None: ...

    @abstractmethod
    def unmount(self, m: Mount) -> None:
        """Unmount ``m.target`` if mounted; a busy mount is detached lazily, not leaked."""

    @abstractmethod
    def mounted(self, target: str) -> bool: ...

    def mounted_among(self, targets: list[str]) -> set[str]:
        """Which of ``targets`` are mounted (one look at the mount table where it can be)."""
        return {t for t in targets if self.mounted(t)}

    @abstractmethod
    def mounts_under(self, directory: Path) -> list[str]:
        """Mount points at or below ``directory``, deepest first (for a last-resort sweep)."""

    @abstractmethod
    def mkfs_ext4(self, image_path: Path, argv: list[str]) -> None:
        """Format ``image_path`` (a sized regular file) with the given mkfs.ext4 argv."""

    def anchor(self, directory: Path) -> bool:
        """Make ``directory`` a mount of its own (see :mod:`tidal.engine.mountview`) unless
        it is one; whether it is one now. Here: never (a mounter without mount namespaces)."""
        return False

    def release_anchor(self, directory: Path) -> None:
        """Undo :meth:`anchor` if nothing is mounted below ``directory`` any more."""
        return None

    def apply(self, plan: Sequence[Mount]) -> list[Mount]:
        """Make every mount of ``plan`` in order; returns the ones this call made.

        A target already mounted is left alone (a shared image lower, or a remount after a
        lost mount that survived). On failure the mounts this call made are undone, newest
        first, before the error propagates.
        """
        made: list[Mount] = []
        present = self.mounted_among([m.target for m in plan])
        try:
            for m in plan:
                Path(m.target).mkdir(parents=True, exist_ok=True)
                if m.target in present:
                    continue
                self._mount(m)
                made.append(m)
        except BaseException:
            for m in reversed(made):
                try:
                    self.unmount(m)
                except TidalError as exc:
                    log.warning("undoing mount %s after a failure: %s", m.target, exc)
            raise
        return made

    def release(self, plan: Sequence[Mount]) -> None:
        """Unmount ``plan`` newest first (the inverse of :meth:`apply`)."""
        for m in reversed(plan):
            self.unmount(m)


class HostMounter(Mounter):
    """The real kernel: mount(2) and loop ioctls, umount(8), mkfs.ext4, Tidal block images."""

    def _mount(self, m: Mount) -> None:
        if m.type == TIDAL_IMAGE:
            from tidal.blockdev import mounts as blockdev_mounts
            from tidal.node import client as node

            if any(
                Path(x.target) == Path(m.target).resolve() for x in blockdev_mounts.list_mounts()
            ):
                node.unmount(m.target, force=True)  # a stale record of a dead mount
            node.mount_image(m.source, m.target)  # by the node service when it runs
            return
        if m.type == OVERLAY:
            _mount_overlay(",".join(m.options), m.target)
        elif m.type == EXT4_LOOP:
            _mount_loop_ext4(m.source, m.target, m.options)
        else:
            raise EngineError(f"unknown mount type {m.type!r} for {m.target}")

    def unmount(self, m: Mount) -> None:
        target = Path(m.target)
        if m.type == TIDAL_IMAGE:
            from tidal.blockdev import mounts as blockdev_mounts
            from tidal.node import client as node

            if ext4.is_mountpoint(target) or any(
                Path(x.target) == target.resolve() for x in blockdev_mounts.list_mounts()
            ):
                node.unmount(target, force=True)
            return
        if not ext4.is_mountpoint(target):
            return
        # umount2(2), not umount(8) (see mountview.sys_umount); an autoclear loop device
        # (mount() here, or mount -o loop) lets go of its file when its mount goes
        try:
            mountview.sys_umount(str(target), 0)
            return
        except OSError as exc:
            if not ext4.is_mountpoint(target):
                return
            why = exc.strerror
        try:
            mountview.sys_umount(str(target), mountview.MNT_DETACH)
        except OSError as exc:
            if ext4.is_mountpoint(target):
                raise QuotaError(
                    f"unmounting {target} lazily (busy: {why}): {exc.strerror}"
                ) from None

    def mounted(self, target: str) -> bool:
        return ext4.is_mountpoint(Path(target))

    def mounted_among(self, targets: list[str]) -> set[str]:
        return ext4.mounted_among(targets) if targets else set()

    def mounts_under(self, directory: Path) -> list[str]:
        found = ext4.mount_roots_below(directory, SWEEP_DEPTH)
        if found is None:
            found = ext4.mount_points_under(directory)
        return sorted(found, key=len, reverse=True)

    def anchor(self, directory: Path) -> bool:
        status = anchor_status(Path("/proc/self/mountinfo").read_text(), str(directory))
        if status == "free":
            try:
                mountview.sys_mount(str(directory), str(directory), "", mountview.MS_BIND, "")
                # private: on a host whose root is shared (systemd's default) the bind would
                # be a peer of it, and every mount below would appear twice in the table
                mountview.sys_mount("", str(directory), "", _MS_PRIVATE, "")
            except OSError as exc:
                log.warning("cannot anchor %s (bind onto itself): %s", directory, exc.strerror)
                return False
            return True
        return status == "anchored"

    def release_anchor(self, directory: Path) -> None:
        table = Path("/proc/self/mountinfo").read_text()
        if anchor_status(table, str(directory)) != "anchored" or _below(directory):
            return
        try:
            mountview.sys_umount(str(directory), 0)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot release the anchor %s: %s", directory, exc.strerror)
                return
        # busy with a file still open through it (a daemon's log, a lock): with nothing
        # mounted below, the anchor is the very directory beneath it, so detaching it lazily
        # loses nothing; looked at again first, as a mount may have come meanwhile
        if _below(directory):
            return
        try:
            mountview.sys_umount(str(directory), mountview.MNT_DETACH)
        except OSError as exc:
            log.warning("cannot release the anchor %s: %s", directory, exc.strerror)

    def mkfs_ext4(self, image_path: Path, argv: list[str]) -> None:
        proc.run(
            argv,
            what=f"formatting quota volume {image_path}",
            error=QuotaError,
            install_hint="apt-get install e2fsprogs",
        )


def _mount_overlay(options: str, target: str) -> None:
    """mount(2) of an overlay, called directly: mount(8) adds a process start (3.7 ms against
    0.4 ms measured here) to every container create, and does nothing an overlay needs
    (no helper, no utab entry: the engine keeps its own records)."""
    try:
        mountview.sys_mount("overlay", target, "overlay", 0, options)
    except OSError as exc:
        raise EngineError(f"overlay mount at {target} failed: {exc.strerror} ({options})") from None


_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A  # Linux >= 5.8: attach and set the flags in one call
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"
_MS_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024}


def _mount_loop_ext4(source: str, target: str, options: tuple[str, ...]) -> None:
    """What ``mount -o loop`` does, by ioctl and mount(2): a free loop device bound to
    ``source`` with autoclear (it detaches when unmounted, or at once if the mount fails),
    then the ext4 mount. Why not mount(8): it reads the whole mount table first, which
    grows by every live container's mounts; in a burst of instances that was 10 % of the
    node's CPU (profiled with perf), on every container create."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _MS_FLAGS:
            flags |= _MS_FLAGS[opt]
        else:
            data.append(opt)
    what = f"mounting quota volume {source} at {target}"
    try:
        backing = os.open(source, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise QuotaError(f"{what}: {exc.strerror}") from None
    try:
        with open("/dev/loop-control", "rb", buffering=0) as ctl:
            for _ in range(16):  # another process may take the free device first
                n = fcntl.ioctl(ctl.fileno(), _LOOP_CTL_GET_FREE)
                try:
                    loop = os.open(f"/dev/loop{n}", os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # its node not made yet
                info = struct.pack(
                    _LOOP_INFO64, 0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR,
                    os.fsencode(source)[-63:], b"", b"", 0, 0,
                )  # fmt: skip
                config = struct.pack("=II", backing, 0) + info + bytes(64)
                try:
                    fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(loop)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise QuotaError(f"{what}: loop device: {exc.strerror}") from None
                try:
                    mountview.sys_mount(f"/dev/loop{n}", target, "ext4", flags, ",".join(data))
                except OSError as exc:
                    raise QuotaError(f"{what}: {exc.strerror}") from None
                finally:
                    os.close(loop)  # autoclear: the mount holds the device, or nothing does
                return
    except OSError as exc:
        raise QuotaError(f"{what}: loop devices: {exc.strerror}") from None
    finally:
        os.close(backing)
    raise QuotaError(f"{what}: no free loop device after 16 tries")


_MS_PRIVATE = 1 << 18


@dataclass(frozen=True)
class _TableEntry:
    id: int
    parent: int
    dev: str
    root: str
    mountpoint: str


def _table(text: str) -> list[_TableEntry]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5:
            out.append(
                _TableEntry(int(f[0]), int(f[1]), f[2], ext4.unescape(f[3]), ext4.unescape(f[4]))
            )
    return out


def _below(directory: Path) -> bool:
    """Whether anything is mounted below ``directory`` (not at it)."""
    return any(p != str(directory) for p in ext4.mount_points_under(directory))


def anchor_status(text: str, directory: str) -> Literal["anchored", "free", "busy"]:
    """Whether ``directory`` is anchored in the mount table ``text``: its top mount a bind
    of the very directory beneath it (same device, same root); else ``free`` when nothing
    is mounted below it (an anchor can be made), ``busy`` when something is (a bind now
    would hide those mounts from their own paths). Pure."""
    entries = _table(text)
    by_id = {e.id: e for e in entries}
    here = [e for e in entries if e.mountpoint == directory]
    stacked = {e.parent for e in here}
    tops = [e for e in here if e.id not in stacked]
    if tops:
        top = tops[-1]
        under = by_id.get(top.parent)
        if under is not None:
            rel = (
                ""
                if under.mountpoint == directory
                else os.path.relpath(directory, under.mountpoint)
            )
            beneath = os.path.normpath(os.path.join(under.root, rel))
            if under.dev == top.dev and os.path.normpath(top.root) == beneath:
                return "anchored"
    prefix = directory.rstrip("/") + "/"
    return "busy" if any(e.mountpoint.startswith(prefix) for e in entries) else "free"


def sweep(mounter: Mounter, directory: Path) -> list[str]:
    """Unmount whatever is still mounted under ``directory`` (lazily if busy); log each one.

    The backstop for a daemon killed between making a mount and recording it."""
    left = []
    for mp in mounter.mounts_under(directory):
        with contextlib.suppress(TidalError):
            mounter.unmount(Mount(OVERLAY, "", mp))
        if mounter.mounted(mp):
            left.append(mp)
        else:
            log.warning("unmounted %s, which no record of the engine named", mp)
    return left


def unmount_path(path: Path) -> None:
    """Unmount a plain mount (overlay, quota volume) at ``path`` on the host, if mounted."""
    HostMounter().unmount(Mount(OVERLAY, "", str(path)))
