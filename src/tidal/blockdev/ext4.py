"""ext4 on a block device: mkfs, mount, umount, and reading the mount table.

The one place in ``tidal.blockdev`` that runs ``mkfs.ext4``, ``mount`` and ``umount`` (apart
from ``record.py``'s script mounting /proc, /dev and /sys inside the recorded command's own
mount namespace); the helpers also serve other parts' ext4 files (the engine's quota volumes:
``mkfs(..., size_bytes=, error=)``, ``mount(..., options="loop,noatime")``,
``umount(..., lazy_fallback=True)``). Their failures become the caller's error class
(:class:`MountError` or :class:`BuildError` by default) naming the device or directory and the
tool's message. Tools run through :func:`tidal.proc.run`.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tidal import proc
from tidal.errors import BuildError, MountError, TidalError

READONLY_OPTIONS = "ro,noload"
"""``noload``: never replay a journal on a read-only image (the device could not take it)."""
READWRITE_OPTIONS = "noatime,noinit_itable"
"""``noatime``: reads must not turn into writes to the layer; ``noinit_itable``: the base
device reads as zeros already, so the kernel need not zero inode tables in the background."""
MKFS_TIMEOUT_S = 300.0
"""mkfs writes metadata only (lazy init), but a multi-GB disk on a loaded node takes seconds."""
MOUNT_TIMEOUT_S = 60.0
E2FSPROGS = "apt-get install e2fsprogs"
SELF_MOUNTINFO = Path("/proc/self/mountinfo")
UTIL_LINUX = "apt-get install util-linux"


@dataclass(frozen=True)
class Ext4Format:
    """How a fresh ext4 filesystem is laid out (the builder's disks, the engine's volumes)."""

    inode_count: int | None = None
    journal: bool = False
    label: str = "tidal"
    block_size_bytes: int = 4096
    uuid: str | None = None
    """Fixed filesystem UUID (default: mkfs picks a random one)."""
    hash_seed: str | None = None
    """Fixed seed of the directory-index hash (default: random), a UUID."""
    metadata_csum: bool = True
    """``False``: no ext4 metadata checksums (``uninit_bg`` group checksums instead)."""
    fake_time_s: int | None = None
    """mkfs's clock (``E2FSPROGS_FAKE_TIME``): the times it writes into the new filesystem."""


def mkfs_command(device: str, fmt: Ext4Format, *, size_bytes: int | None = None) -> list[str]:
    """mkfs.ext4 arguments that write only metadata (never the whole disk); no reserved
    blocks (an image or a quota is all its user's). ``size_bytes`` sizes the filesystem when
    ``device`` is a file larger than wanted (default: the whole device)."""
    cmd = ["mkfs.ext4", "-F", "-q", "-m", "0", "-b", str(fmt.block_size_bytes), "-L", fmt.label]
    extended = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    if fmt.hash_seed:
        extended += f",hash_seed={fmt.hash_seed}"
    cmd += ["-E", extended]
    if fmt.uuid:
        cmd += ["-U", fmt.uuid]
    features = [] if fmt.journal else ["^has_journal"]
    if not fmt.metadata_csum:
        features += ["^metadata_csum", "uninit_bg"]  # lazy inode tables need a group checksum
    if features:
        cmd += ["-O", ",".join(features)]
    if fmt.inode_count:
        cmd += ["-N", str(fmt.inode_count)]
    cmd.append(device)
    if size_bytes is not None:
        cmd.append(f"{size_bytes // 1024}k")
    return cmd


def mkfs(
    device: str | Path,
    fmt: Ext4Format,
    *,
    size_bytes: int | None = None,
    error: type[TidalError] = BuildError,
) -> None:
    """Format ``device`` (a block device or a plain file) as ext4."""
    env = None
    if fmt.fake_time_s is not None:
        env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(fmt.fake_time_s)}
    proc.run(
        mkfs_command(str(device), fmt, size_bytes=size_bytes),
        what=f"formatting {device} as ext4",
        error=error,
        timeout_s=MKFS_TIMEOUT_S,
        install_hint=E2FSPROGS,
        env=env,
    )


def mount(
    device: str | Path,
    target: Path | str,
    *,
    readonly: bool,
    options: str | None = None,
    error: type[TidalError] = MountError,
) -> None:
    """Mount ext4 ``device`` at ``target``: read-only images with ``noload``, writable ones
    with ``noatime``; ``options`` replaces those (e.g. ``loop,noatime`` for a file)."""
    opts = options if options is not None else (READONLY_OPTIONS if readonly else READWRITE_OPTIONS)
    if options is not None and readonly:
        opts = f"ro,{opts}"
    proc.run(
        ["mount", "-t", "ext4", "-o", opts, str(device), str(target)],
        what=f"mounting {device} (ext4, {opts}) at {target}",
        error=error,
        timeout_s=MOUNT_TIMEOUT_S,
        install_hint=UTIL_LINUX,
    )


def umount(
    target: Path | str,
    *,
    lazy: bool = False,
    lazy_fallback: bool = False,
    error: type[TidalError] = MountError,
) -> None:
    """Unmount ``target``. ``lazy`` detaches it at once and lets the kernel finish when the
    last user lets go; ``lazy_fallback`` first tries a normal unmount and detaches lazily only
    if that fails while ``target`` is still mounted (busy), so nothing is leaked."""
    if lazy_fallback and not lazy:
        try:
            umount(target, error=error)
            return
        except TidalError:
            if not is_mountpoint(Path(target)):
                return
        lazy = True
    proc.run(
        ["umount", *(["--lazy"] if lazy else []), str(target)],
        what=f"unmounting {target}{' (lazy)' if lazy else ''}",
        error=error,
        timeout_s=MOUNT_TIMEOUT_S,
        install_hint=UTIL_LINUX,
    )


def unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: Path = SELF_MOUNTINFO) -> dict[str, tuple[str, str]]:
    """Mount point -> (filesystem type, source) from the kernel's table (no stat, so a dead
    FUSE mount does not hang or fail the lookup)."""
    table: dict[str, tuple[str, str]] = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 2:
            table[unescape(fields[4])] = (rfields[0], unescape(rfields[1]))
    return table


def mount_points_under(directory: Path, mountinfo: Path = SELF_MOUNTINFO) -> list[str]:
    """Mount points at or below ``directory`` (as filtering :func:`mount_points`), parsing
    only the table's lines that hold the escaped directory (see :func:`is_mountpoint`)."""
    base = str(directory).rstrip("/") or "/"
    prefix = base.rstrip("/") + "/"
    needle = " " + _escape(base)
    found = []
    for line in mountinfo.read_text().splitlines():
        if needle not in line:
            continue
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 2:
            mp = unescape(fields[4])
            if mp == base or mp.startswith(prefix):
                found.append(mp)
    return found


def _escape(path: str) -> str:
    """A path as the mount table writes it (the inverse of :func:`unescape`)."""
    for ch, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        path = path.replace(ch, code)
    return path


_AT_FDCWD = -100
_AT_NO_AUTOMOUNT = 0x800
_AT_STATX_DONT_SYNC = 0x4000
_STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256  # struct statx; stx_attributes at 8, stx_attributes_mask at 56
_libc_statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)


def mount_root(path: Path | str) -> bool | None:
    """Whether ``path`` is the root of a mount, from one statx(2) (``STATX_ATTR_MOUNT_ROOT``,
    Linux 5.8), or None where the kernel or libc cannot say (then read the table).

    Why not the table: the kernel writes the whole table on every read, and with a few
    thousand mounts (hundreds of instances on a node) those reads were a fifth of the node's
    CPU in a burst of creates. ``AT_STATX_DONT_SYNC`` keeps a FUSE mount whose server is dead
    or stopped from being asked anything (the attribute is the VFS's own), so this does not
    hang where the table would not."""
    if _libc_statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = _AT_NO_AUTOMOUNT | _AT_STATX_DONT_SYNC
    if _libc_statx(_AT_FDCWD, os.fsencode(path), flags, 0, buf) != 0:
        err = ctypes.get_errno()
        exc = OSError(err, os.strerror(err))
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return False  # no such directory: nothing is mounted there
        return None  # (a dead FUSE mount answers ENOTCONN: the table decides)
    attributes, mask = struct.unpack_from("=Q", buf, 8)[0], struct.unpack_from("=Q", buf, 56)[0]
    if not mask & _STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attributes & _STATX_ATTR_MOUNT_ROOT)


def mount_roots_below(directory: Path, depth: int) -> list[str] | None:
    """Mount points at or below ``directory`` down to ``depth`` levels, found by
    :func:`mount_root` on each directory (a mount's own tree is not entered), or None where
    statx cannot say (then read the table: :func:`mount_points_under`). For a directory whose
    mount points are known to lie no deeper than ``depth``: a look per entry, not the whole
    table."""
    found: list[str] = []

    def visit(d: Path, left: int) -> bool:
        known = mount_root(d)
        if known is None:
            return False
        if known:
            found.append(str(d))
            return True
        if left == 0:
            return True
        try:
            entries = [Path(e.path) for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return True
        return all(visit(e, left - 1) for e in entries)

    return found if visit(directory, depth) else None


def is_mountpoint(path: Path, mountinfo: Path = SELF_MOUNTINFO) -> bool:
    """Whether ``path`` is a mount point (as ``str(path) in mount_points()``): asked of
    :func:`mount_root` first, the table only where that cannot say.

    In the table the escaped path is searched first (a substring search, in C) and only
    lines holding it are parsed: parsing the whole table in Python took most of each
    container's create and start, which check several mount points each."""
    if mountinfo == SELF_MOUNTINFO:
        known = mount_root(path)
        if known is not None:
            return known
    return _in_table(str(path), mountinfo.read_text())


def mounted_among(paths: list[str], mountinfo: Path = SELF_MOUNTINFO) -> set[str]:
    """Which of ``paths`` are mount points: each by :func:`mount_root`, and those it cannot
    say from one read of the table."""
    found: set[str] = set()
    unknown = paths
    if mountinfo == SELF_MOUNTINFO:
        answers = {p: mount_root(p) for p in paths}
        found = {p for p, a in answers.items() if a}
        unknown = [p for p, a in answers.items() if a is None]
    if not unknown:
        return found
    text = mountinfo.read_text()
    return found | {p for p in unknown if _in_table(p, text)}


def _in_table(target: str, text: str) -> bool:
    needle = " " + _escape(target) + " "
    at = text.find(needle)
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        line = text[start : end if end >= 0 else len(text)]
        at = text.find(needle, at + 1)
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 2 and unescape(fields[4]) == target:
            return True
    return False
