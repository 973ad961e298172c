"""Record which blocks an application reads while it starts: ``tidal image record``.

The image is mounted read-write over a throw-away writable layer with the FUSE server
recording every range read (offsets and lengths only, in first-access order). The command
runs chrooted into the mount, in its own mount and PID namespaces (``unshare``) with /proc,
/dev and /sys inside, until it exits, prints the ``ready_line``, or hits the time limit;
then everything is unmounted and the trace is returned. :func:`attach_trace` (in
``tidal.image.manifest``) stores it as the image's trace layer, which ``tidal image push``
uploads with the image and a cold lazy mount replays.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tidal.blockdev import mounts
from tidal.blockdev.settings import DEFAULT_RECORD_TIMEOUT_S
from tidal.config import data_root
from tidal.errors import ConfigError, MountError, TidalError
from tidal.image.manifest import Image
from tidal.image.trace import Trace
from tidal.proc import spawn

DEFAULT_TIMEOUT_S = DEFAULT_RECORD_TIMEOUT_S
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as the namespaces' first process: make the mount points, mount the kernel's
# filesystems inside the image, and become the command. "$@" carries the argv untouched.
_CHROOT_SCRIPT = r"""
set -e
root=$1; shift
mkdir -p "$root/proc" "$root/dev" "$root/sys" "$root/tmp"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t sysfs -o ro sysfs "$root/sys" 2>/dev/null || true
exec chroot "$root" "$@"
"""


@dataclass(frozen=True)
class RecordResult:
    trace: Trace
    ended_by: str
    """``exit``, ``ready line`` or ``time limit``."""
    exit_code: int | None
    seconds: float
    output_tail: str


def image_command(image_dir: str | os.PathLike[str]) -> list[str]:
    """The image's own Entrypoint + Cmd (from its OCI config), for ``record`` without a command."""
    config = Image.open(image_dir).manifest.config
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not argv:
        raise ConfigError(f"image {image_dir} declares no Entrypoint or Cmd: give a command")
    return [str(a) for a in argv]


def image_env(image_dir: str | os.PathLike[str]) -> dict[str, str]:
    """PATH and HOME defaults, then the image's own ``Env``."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb"}
    for item in Image.open(image_dir).manifest.config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            env[key] = value
    return env


def record_trace(
    image_dir: str | os.PathLike[str],
    argv: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ready_line: str | None = None,
    env: dict[str, str] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> RecordResult:
    """Run ``argv`` from the image and return the block ranges it read.

    Stops at the command's exit, at the first output line containing ``ready_line``, or at
    ``timeout_s`` (a server never exits: the time limit or a ready line is how its recording
    ends). Nothing is left mounted, whatever happens.
    """
    if not argv:
        raise ConfigError("record needs a command to run")
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        raise ConfigError("record needs unshare and chroot (Debian packages util-linux, coreutils)")
    if os.geteuid() != 0:
        raise ConfigError("record mounts the image and enters namespaces: run it as root")
    scratch_root = data_root() / "record"
    scratch_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rec-", dir=scratch_root))
    target, trace_file = work / "root", work / "trace"
    run_env = {**image_env(image_dir), **(env or {})}
    try:
        mounts.mount_image(image_dir, target, writable_dir=work / "writable", trace_out=trace_file)
        try:
            cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
            cmd += ["sh", "-c", _CHROOT_SCRIPT, "sh", str(target), *argv]
            ended_by, code, seconds, tail = _run(
                cmd,
                run_env,
                timeout_s,
                ready_line,
                on_output,
            )
        finally:
            try:
                mounts.unmount(target)
            except MountError:
                mounts.unmount(target, force=True)
        try:
            data = trace_file.read_bytes()
        except FileNotFoundError:
            raise MountError(
                f"the FUSE server wrote no trace to {trace_file}; see its log for why"
            ) from None
        trace = Trace.deserialize(data, name=str(trace_file))
        return RecordResult(trace, ended_by, code, seconds, tail)
    finally:
        with contextlib.suppress(TidalError):
            if target.is_dir() and any(m.target == str(target) for m in mounts.list_mounts()):
                mounts.unmount(target, force=True)
        shutil.rmtree(work, ignore_errors=True)


def _run(
    cmd: list[str],
    env: dict[str, str],
    timeout_s: float,
    ready_line: str | None,
    on_output: Callable[[str], None] | None,
) -> tuple[str, int | None, float, str]:
    """Run the command, reading its output as it comes (hence a spawned child, not
    :func:`tidal.proc.run`): the ready line or the time limit may end it early."""
    t0 = time.monotonic()
    proc = spawn(
        cmd,
        what="recording the command's reads",
        error=MountError,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf = b""
    ended_by = "exit"
    try:
        while True:
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                ended_by = "time limit"
                break
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            hit = False
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                if on_output is not None:
                    on_output(line)
                hit = hit or (ready_line is not None and ready_line in line)
            del lines[:-20]
            if hit:
                ended_by = "ready line"
                break
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        proc.stdout.close()
    if buf:
        lines.append(buf.decode(errors="replace"))
    return (
        ended_by,
        (code if ended_by == "exit" else None),
        time.monotonic() - t0,
        "\n".join(lines[-20:]),
    )
