"""Loop devices through ``losetup``: attach a file, detach, list, and sweep up orphans.

A thin adapter: the only place that runs ``losetup``. Failures become :class:`MountError`
naming the file or device and losetup's own message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from tidal import proc
from tidal.errors import MountError

log = logging.getLogger(__name__)

LOSETUP_TIMEOUT_S = 60.0
"""losetup answers in milliseconds; a minute means the loop driver is stuck."""


@dataclass(frozen=True)
class LoopDevice:
    """One attached loop device."""

    device: str
    """``/dev/loopN``."""
    backing_file: str
    readonly: bool
    direct_io: bool
    backing_id: str = ""
    """``MAJ:MIN:INODE`` of the backing file: names it even when its path no longer resolves
    (a FUSE disk whose mount went away shows as ``/disk``)."""


def _losetup(args: list[str], what: str) -> str:
    return str(
        proc.run(
            ["losetup", *args],
            what=what,
            error=MountError,
            timeout_s=LOSETUP_TIMEOUT_S,
            install_hint="apt-get install util-linux",
        ).stdout
    )


def attach(backing_file: Path, *, readonly: bool, direct_io: bool = True) -> LoopDevice:
    """Attach ``backing_file`` to a free loop device.

    ``direct_io`` makes the loop driver read the file with O_DIRECT, so the FUSE file's page
    cache does not hold a second copy of what ext4 already caches; it is dropped silently by
    the kernel where unsupported, and the result says what was granted.
    """
    args = ["--find", "--show"]
    if readonly:
        args.append("--read-only")
    if direct_io:
        args.append("--direct-io=on")
    name = _losetup(
        [*args, str(backing_file)], f"attaching {backing_file} to a loop device"
    ).strip()
    if not name.startswith("/dev/"):
        raise MountError(f"attaching {backing_file}: losetup printed {name!r}, not a device")
    found = get(name)
    if found is None:
        raise MountError(f"attaching {backing_file}: {name} vanished right after attach")
    return found


def set_read_ahead(device: str, read_ahead_kb: int) -> None:
    """Set the kernel's read-ahead of ``device`` (``/sys/block/loopN/queue/read_ahead_kb``).

    ext4 on the loop device reads files ahead by this much; on a lazy image every read-ahead
    is bytes fetched, so it trades requests against bytes before ready. A sysfs write, not a
    tool: ``blockdev --setra`` would be one more process per mount.
    """
    name = Path(device).name
    path = Path("/sys/block") / name / "queue" / "read_ahead_kb"
    try:
        path.write_text(f"{int(read_ahead_kb)}\n")
    except OSError as exc:
        raise MountError(f"setting read-ahead of {device} to {read_ahead_kb} KiB: {exc}") from exc


def read_ahead_kb(device: str) -> int:
    """The kernel's read-ahead of ``device`` in KiB."""
    path = Path("/sys/block") / Path(device).name / "queue" / "read_ahead_kb"
    try:
        return int(path.read_text())
    except (OSError, ValueError) as exc:
        raise MountError(f"reading the read-ahead of {device}: {exc}") from exc


def detach(device: str) -> None:
    """Detach ``device``. If something still holds it, the kernel detaches it on last close."""
    _losetup(["--detach", device], f"detaching {device}")


def list_devices() -> list[LoopDevice]:
    """Every attached loop device."""
    out = _losetup(
        ["--list", "--json", "--output", "NAME,BACK-FILE,RO,DIO,BACK-INO,BACK-MAJ:MIN"],
        "listing loop devices",
    )
    if not out.strip():
        return []
    try:
        rows = json.loads(out).get("loopdevices", [])
    except json.JSONDecodeError as exc:
        raise MountError(f"listing loop devices: losetup printed unparsable JSON: {exc}") from exc
    return [
        LoopDevice(
            device=r["name"],
            backing_file=(r.get("back-file") or "").removesuffix(" (deleted)"),
            readonly=_flag(r.get("ro")),
            direct_io=_flag(r.get("dio")),
            backing_id=f"{str(r.get('back-maj:min') or '').strip()}:{r.get('back-ino') or ''}",
        )
        for r in rows
    ]


def _flag(value: object) -> bool:
    return value in (True, 1, "1")


def get(device: str) -> LoopDevice | None:
    return next((d for d in list_devices() if d.device == device), None)


def detach_orphans(under: Path, keep: Collection[str] = ()) -> list[str]:
    """Detach loop devices backed by files below ``under`` that no recorded mount owns.

    Such devices are what a crash between "attach" and "record the mount" leaves behind.
    Returns the devices detached.
    """
    prefix = str(under).rstrip("/") + "/"
    done = []
    for dev in list_devices():
        if dev.backing_file.startswith(prefix) and dev.device not in keep:
            try:
                detach(dev.device)
                done.append(dev.device)
                log.warning("detached orphan loop device %s (%s)", dev.device, dev.backing_file)
            except MountError as exc:
                log.warning("could not detach orphan %s: %s", dev.device, exc)
    return done
