"""ext4 on a block device: mkfs, mount, umount, and reading the mount table.

The only place that runs ``mkfs.ext4``, ``mount`` and ``umount``; their failures become
:class:`MountError` or :class:`BuildError` naming the device or directory and the tool's message.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tidal.errors import BuildError, MountError

READONLY_OPTIONS = "ro,noload"
"""``noload``: never replay a journal on a read-only image (the device could not take it)."""
READWRITE_OPTIONS = "noatime,noinit_itable"
"""``noatime``: reads must not turn into writes to the layer; ``noinit_itable``: the base
device reads as zeros already, so the kernel need not zero inode tables in the background."""


@dataclass(frozen=True)
class Ext4Format:
    """How the builder formats a fresh virtual disk."""

    inode_count: int | None = None
    journal: bool = False
    label: str = "tidal"
    block_size_bytes: int = 4096


def run_tool(
    cmd: list[str], what: str, error: type[Exception] = MountError, timeout_s: float = 300
) -> str:
    """Run an external tool; its failure becomes ``error`` with the tool's stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except FileNotFoundError:
        raise error(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {cmd[0]} did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(f"{what}: {'; '.join(msg[-3:]) or f'exit status {proc.returncode}'}")
    return proc.stdout


def mkfs_command(device: str, fmt: Ext4Format) -> list[str]:
    """mkfs.ext4 arguments that write only metadata (never the whole disk)."""
    cmd = ["mkfs.ext4", "-F", "-q", "-m", "0", "-b", str(fmt.block_size_bytes), "-L", fmt.label]
    cmd += ["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
    if not fmt.journal:
        cmd += ["-O", "^has_journal"]
    if fmt.inode_count:
        cmd += ["-N", str(fmt.inode_count)]
    return [*cmd, device]


def mkfs(device: str, fmt: Ext4Format) -> None:
    run_tool(mkfs_command(device, fmt), f"formatting {device} as ext4", BuildError)


def mount(device: str, target: Path, *, readonly: bool) -> None:
    opts = READONLY_OPTIONS if readonly else READWRITE_OPTIONS
    run_tool(
        ["mount", "-t", "ext4", "-o", opts, device, str(target)],
        f"mounting {device} (ext4, {opts}) at {target}",
    )


def umount(target: Path, *, lazy: bool = False) -> None:
    run_tool(
        ["umount", *(["--lazy"] if lazy else []), str(target)],
        f"unmounting {target}{' (lazy)' if lazy else ''}",
    )


def _unescape(field: str) -> str:
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


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, tuple[str, str]]:
    """Mount point -> (filesystem type, source) from the kernel's table (no stat, so a dead
    FUSE mount does not hang or fail the lookup)."""
    table: dict[str, tuple[str, str]] = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 2:
            table[_unescape(fields[4])] = (rfields[0], _unescape(rfields[1]))
    return table


def is_mountpoint(path: Path) -> bool:
    return str(path) in mount_points()
