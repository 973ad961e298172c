"""Starting a container's monitor: pre-launched interpreter, configuration, ready report.

The monitor (:mod:`tidal.engine.monitor`) is a long-lived child, so this is one of the two
places in the engine that use ``Popen`` directly (the other is lxcfs). The interpreter is
started before storage is prepared (:func:`launch_monitor`); Python's start-up (tens of ms) then
overlaps the storage set-up instead of adding to it, the largest single item of the engine's
start latency. :func:`hand_over` sends the :class:`~tidal.engine.monitor.MonitorConfig` and
waits for the monitor's :class:`~tidal.engine.monitor.StartReport`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tidal.engine.monitor import MonitorConfig, StartReport
from tidal.fsutil import read_line, write_json_atomic

log = logging.getLogger(__name__)
MONITOR_READY_TIMEOUT_S = 60.0


@dataclass
class MonitorLaunch:
    """A monitor interpreter started ahead of time, waiting for its configuration."""

    proc: subprocess.Popen[bytes]
    ready_fd: int
    _fd_open: bool = True

    def close_fd(self) -> None:
        if self._fd_open:
            os.close(self.ready_fd)
            self._fd_open = False

    def abort(self) -> None:
        """EOF on its stdin makes the (forked) monitor exit without doing anything."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError as exc:
            log.debug("closing an abandoned monitor's stdin: %s", exc)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.close_fd()


def package_root() -> str:
    """The directory holding the ``tidal`` package, so the monitor imports this same code."""
    import tidal

    return str(Path(tidal.__file__).resolve().parent.parent)


def launch_monitor() -> MonitorLaunch:
    """Start a monitor's interpreter now; it waits for its configuration on stdin."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-m", "tidal.engine.monitor", "-", str(w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(w,),
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": package_root()},
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return MonitorLaunch(proc, r)


def hand_over(conf: MonitorConfig, launch: MonitorLaunch | None) -> StartReport:
    """Give ``conf`` to a (pre-launched) monitor and wait for its start report.

    ``monitor.json`` keeps the configuration next to the container, for debugging."""
    cdir = Path(conf.cdir)
    raw = conf.to_json()
    write_json_atomic(cdir / "monitor.json", raw)
    launch = launch or launch_monitor()
    fail = StartReport("failed", conf.start_seq, 0)
    try:
        assert launch.proc.stdin is not None
        launch.proc.stdin.write(json.dumps(raw).encode())
        launch.proc.stdin.close()
        launch.proc.wait(timeout=30)  # the first fork returns at once
        line = read_line(launch.ready_fd, MONITOR_READY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        launch.abort()
        return StartReport(
            **{**fail.to_json(), "error": f"monitor did not take its configuration: {exc}"}
        )
    finally:
        launch.close_fd()
    if not line:
        try:
            tail = (cdir / "monitor.log").read_text(errors="replace").strip()[-1000:]
        except OSError:
            tail = ""
        return StartReport(
            **{**fail.to_json(), "error": f"monitor exited without a report: {tail or 'no log'}"}
        )
    return StartReport.from_json(json.loads(line))
