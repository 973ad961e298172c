"""Resource view isolation: lxcfs on a private mountpoint, started and supervised by the daemon.

lxcfs answers reads of its ``proc/meminfo`` (cpuinfo, stat, uptime, ...) with the figures of
the *reading* process's cgroups, so binding those files over a container's /proc makes
``free`` and a JVM see the container's memory limit instead of the host's. The engine runs its
own lxcfs on ``<state>/lxcfs`` rather than relying on the distribution's service at
/var/lib/lxcfs, so it controls its lifetime; the process runs in its own session so that it
(and the containers' views) outlive a daemon restart. :meth:`LxcfsSupervisor.check` restarts it
when it died, first dropping the dead FUSE mount.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tidal import proc
from tidal.blockdev.ext4 import mount_points
from tidal.engine.bundle import LXCFS_PROC_FILES
from tidal.errors import EngineError

log = logging.getLogger(__name__)
START_TIMEOUT_S = 5.0
LXCFS_OPTIONS = ("--enable-cfs", "--enable-loadavg")
"""Without these lxcfs shows only memory limits: ``--enable-cfs`` makes /proc/cpuinfo and
/proc/stat show the CPUs the CFS quota allows (on top of the cpuset it always honours),
``--enable-loadavg`` makes /proc/loadavg the container's own (lxcfs 4.0 and later)."""


def available() -> bool:
    return shutil.which("lxcfs") is not None and Path("/dev/fuse").exists()


class LxcfsSupervisor:
    """Keeps one lxcfs serving ``mountpoint``; safe to call :meth:`ensure` from many threads."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid_file = mountpoint.parent / "lxcfs.pid"
        self.log_file = mountpoint.parent / "lxcfs.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._warned_pid = 0

    @property
    def proc_dir(self) -> Path:
        return self.mountpoint / "proc"

    def files(self) -> tuple[str, ...]:
        """The /proc files this lxcfs provides (older versions lack some)."""
        return tuple(f for f in LXCFS_PROC_FILES if (self.proc_dir / f).exists())

    def pid(self) -> int:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    def mounted(self) -> bool:
        fs = mount_points().get(str(self.mountpoint))
        return fs is not None and fs[0] == "fuse.lxcfs"

    def healthy(self) -> bool:
        if not self.mounted():
            return False
        try:
            (self.proc_dir / "uptime").read_bytes()
        except OSError:
            return False
        return True

    def ensure(self) -> None:
        """Start lxcfs unless a healthy one already serves the mountpoint."""
        self._reap()
        if self.healthy():
            self._check_options()
            return
        if self._proc is not None:
            # ours, but no longer serving: make sure it is gone and reaped before replacing it
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self.mounted():
            log.warning("lxcfs at %s is dead; remounting", self.mountpoint)
            proc.run_logged(
                ["umount", "-l", self.mountpoint], what=f"dropping dead lxcfs at {self.mountpoint}"
            )
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as fh:
            self._proc = proc.spawn(
                ["lxcfs", *LXCFS_OPTIONS, "-p", str(self.pid_file), str(self.mountpoint)],
                what=f"starting lxcfs at {self.mountpoint}",
                error=EngineError,
                install_hint="apt-get install lxcfs",
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise EngineError(
            f"lxcfs did not come up at {self.mountpoint}: {'; '.join(tail) or 'no output'}; "
            f"run containers with --no-lxcfs or fix lxcfs (log: {self.log_file})"
        )

    def _check_options(self) -> None:
        """Warn (once) about a running lxcfs started without the CPU and loadavg views (an
        older Tidal's): restarting it would break the views of the containers using it."""
        pid = self.pid()
        if pid <= 0 or pid == self._warned_pid:
            return
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        missing = [o for o in LXCFS_OPTIONS if o.encode() not in argv]
        if missing:
            self._warned_pid = pid
            log.warning(
                "lxcfs (pid %d) at %s runs without %s, so containers see the host's CPUs "
                "or load; once no container uses it, end it (kill %d; umount -l %s) and "
                "the engine starts one with them",
                pid,
                self.mountpoint,
                " ".join(missing),
                pid,
                self.mountpoint,
            )

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def stop(self) -> None:
        """Unmount and end lxcfs (tests and ``daemon --stop-lxcfs``; containers lose their view)."""
        if self.mounted():
            proc.run(["umount", self.mountpoint], what="unmounting lxcfs", check=False)
            if self.mounted():
                proc.run_logged(
                    ["umount", "-l", self.mountpoint], what=f"unmounting lxcfs at {self.mountpoint}"
                )
        pid = self._proc.pid if self._proc is not None else self.pid()
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
