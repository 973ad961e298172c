"""A mount namespace for one runtime command without the other containers' mounts.

Every live container has mounts of its own in the host's table (its overlay root, its quota
volume), and ``runc run`` reads the whole table (``/proc/self/mountinfo``) twice on the host
side and twice more in ``runc init``, copies it into the container's new namespace and
detaches it again after ``pivot_root``. So each start got slower as the node filled: perf
showed the table's formatting (``show_mountinfo``, ``mangle_path``) and its copies taking
most of the growth from 109 to 255 ms of an instance's start phase between the first and
last fifth of a 500-instance burst, and bare ``runc`` beside 700 extra mounts took 64 ms
against 41.

The engine therefore keeps its state directory as a mount of its own, the *anchor* (a bind
of the directory onto itself, private, made when nothing is mounted below it yet; the whole state
directory, not only ``containers/``, as files are renamed between its parts and rename(2)
does not cross mounts), and the monitor runs the runtime's create in a namespace of its own
(:func:`trimmed_view`): a copy of the host's, made a slave of it (nothing done there reaches
the host), in which the anchor is detached, so all containers' mounts go at once, and the
directories the container's ``config.json`` names below the anchor (its own container
directory, a pod sandbox's, the lxcfs mount) are put back as recursive clones taken just
before. The runtime then sees the host's few mounts and the
container's own; the container's namespace is copied from that one. The monitor goes back
to the host's namespace afterwards, so the trimmed one lives only as long as the command:
nothing keeps a container's mounts alive longer than before.

Only for runtimes none of whose processes outlive the command with that view
(``RuntimeCapabilities.trimmed_mount_view``: runc, crun; not runsc, whose gofer serves the
later members of a pod from the namespace it was started in). Anything failing here (an
old kernel without ``open_tree``) falls back to the host's namespace: slower, not wrong.

Standard library only: imported by the monitor (:mod:`tidal.engine.monitor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator
from typing import Any

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2
SYS_OPEN_TREE = 428  # the same number on every architecture (the syscall table's common part)
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004

_libc: Any = None


def libc() -> Any:
    """The C library with the argument types of the mount calls (the engine's one handle:
    :mod:`tidal.engine.mounter` calls mount(2) through it too)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unshare.argtypes = [ctypes.c_int]
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


MS_BIND = 4096


def _errno_unless_zero(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    """mount(2); OSError with the errno on failure."""
    args = (os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode())
    _errno_unless_zero(libc().mount(*args))


def sys_umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2): what umount(8) does for the engine's mounts without reading the whole mount
    table first (libmount parses ``/proc/self/mountinfo``, which grows with every live
    container: in a teardown of 500 instances ``umount`` processes took a fifth of the CPU)."""
    _errno_unless_zero(libc().umount2(os.fsencode(target), flags))


def sys_unshare(flags: int) -> None:
    """unshare(2) of the calling thread; OSError with the errno on failure."""
    _errno_unless_zero(libc().unshare(flags))


def sys_setns(fd: int, nstype: int) -> None:
    """setns(2) of the calling thread; OSError with the errno on failure."""
    _errno_unless_zero(libc().setns(fd, nstype))


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def kept_dirs(config: dict[str, Any], anchor: str, per_entry: Iterable[str] = ()) -> list[str]:
    """The directories below ``anchor`` that ``config`` (an OCI ``config.json``) names
    anywhere (its root, bind sources, namespace paths, hook arguments): a directory right
    below ``anchor``, or for those of ``per_entry`` (``containers``) the entry below that
    (one container's, never all of them). Pure."""
    prefix = anchor.rstrip("/") + "/"
    split = set(per_entry)
    found: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.startswith(prefix):
                parts = [p for p in v[len(prefix) :].split("/") if p]
                depth = 2 if parts and parts[0] in split else 1
                if len(parts) >= depth and not {".", ".."} & set(parts[:depth]):
                    found.add(prefix + "/".join(parts[:depth]))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(config)
    return sorted(found)


@contextlib.contextmanager
def trimmed_view(anchor: str, keep: Iterable[str]) -> Iterator[str | None]:
    """Run the body in a copy of this process's mount namespace without the mounts below
    ``anchor`` other than those of ``keep``; yields None, or why the host's namespace is
    used instead. The process must be single-threaded (a mount namespace is per process)."""
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)

    def back() -> None:
        if os.stat("/proc/self/ns/mnt").st_ino != os.fstat(home).st_ino:
            _check(libc().setns(home, CLONE_NEWNS), "setns back to the host's namespace")
            os.fchdir(cwd)

    try:
        try:
            _enter(anchor, list(keep))
        except OSError as exc:
            back()  # a half-trimmed view is never used
            yield str(exc.strerror or exc)
            return
        try:
            yield None
        finally:
            back()
    finally:
        os.close(home)
        os.close(cwd)


def _enter(anchor: str, keep: list[str]) -> None:
    c = libc()
    _check(c.unshare(CLONE_NEWNS), "unshare")
    # a slave first: on a host whose mounts are shared, the detach would otherwise reach it
    _check(c.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making the copy a slave")
    clones: list[tuple[int, str]] = []
    try:
        for path in keep:
            flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
            fd = c.syscall(
                ctypes.c_long(SYS_OPEN_TREE),
                ctypes.c_long(AT_FDCWD),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.c_long(flags),
            )
            clones.append((_check(fd, f"cloning {path}"), path))
        _check(c.umount2(os.fsencode(anchor), MNT_DETACH), f"detaching {anchor}")
        for fd, path in clones:
            rc = c.syscall(
                ctypes.c_long(SYS_MOVE_MOUNT),
                ctypes.c_long(fd),
                ctypes.c_char_p(b""),
                ctypes.c_long(AT_FDCWD),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.c_long(MOVE_MOUNT_F_EMPTY_PATH),
            )
            _check(rc, f"putting {path} back")
    finally:
        for fd, _ in clones:
            os.close(fd)
