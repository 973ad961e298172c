"""Starting a container's monitor: pre-launched interpreter, configuration, ready report.

The monitor (:mod:`tidal.engine.monitor`) is a long-lived child, so this is one of the two
places in the engine that use ``Popen`` directly (the other is lxcfs). Python's start-up and
the monitor's imports (tens of ms) are the largest single item of the engine's start latency,
so the engine keeps a :class:`MonitorPool`: monitors started ahead of time, imported and
waiting for a configuration on stdin. A start takes one (and a replacement is started in the
background); :func:`hand_over` sends the :class:`~tidal.engine.monitor.MonitorConfig` and
waits for the monitor's :class:`~tidal.engine.monitor.StartReport`. A waiting monitor that
gets EOF (the engine closed, or its daemon died) exits without doing anything.

By default the pool holds no interpreters but one :class:`MonitorZygote`: a monitor process
imported once that forks a monitor per start (:func:`tidal.engine.monitor.zygote`), so a
burst of starts pays neither an interpreter start nor the imports per container, and the
monitors share the imported pages (see the README's "light path"). If the zygote cannot be
started or dies, starts fall back to interpreters started ahead, as before.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tidal import proc as tidal_proc
from tidal.engine.monitor import ZYGOTE_FLAG, MonitorConfig, StartReport
from tidal.errors import EngineError
from tidal.fsutil import read_line, write_json_atomic

log = logging.getLogger(__name__)
MONITOR_READY_TIMEOUT_S = 60.0
WARM_MONITORS = 1
"""Monitors kept started and imported ahead of the next container start (without a zygote)."""
ZYGOTE_ANSWER_TIMEOUT_S = 30.0
"""How long a fork request may wait for the zygote's answer before it is taken as dead."""


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

    def usable(self) -> bool:
        """Not yet used, and its monitor still waiting (a dead one has closed the pipe)."""
        if not self._fd_open or self.proc.stdin is None or self.proc.stdin.closed:
            return False
        poller = select.poll()  # not select(): the daemon's fds can be numbered past 1024
        poller.register(self.ready_fd, select.POLLIN)
        return not poller.poll(0)


class MonitorZygote:
    """One pre-imported monitor process that forks a monitor per start. Thread-safe."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = tidal_proc.spawn(
                [sys.executable, "-S", "-m", "tidal.engine.monitor", ZYGOTE_FLAG,
                 str(theirs.fileno())],
                what="starting the container monitors' zygote",
                error=EngineError,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": package_root()},
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._sock.settimeout(ZYGOTE_ANSWER_TIMEOUT_S)
        self._lock = threading.Lock()
        self._broken = False

    def alive(self) -> bool:
        return not self._broken and self.proc.poll() is None

    def fork(self, raw_conf: bytes, ready_w: int) -> int:
        """Have a monitor forked for ``raw_conf`` reporting on ``ready_w``; its pid. An
        :class:`EngineError` if the zygote is gone (the caller starts an interpreter)."""
        with self._lock:
            try:
                socket.send_fds(self._sock, [raw_conf], [ready_w])
                answer = self._sock.recv(64)
            except OSError as exc:
                self._broken = True
                raise EngineError(f"the container monitors' zygote is gone: {exc}") from exc
        if not answer or not answer.isdigit() or int(answer) <= 0:
            self._broken = not answer
            raise EngineError(f"the container monitors' zygote did not fork: {answer!r}")
        return int(answer)

    def close(self) -> None:
        """EOF on its socket ends it; the monitors it forked run on."""
        self._broken = True
        self._sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ZygoteLaunch:
    """A start served by the zygote: nothing is waiting, so there is nothing to abort."""

    zygote: MonitorZygote

    def abort(self) -> None:
        return None

    def usable(self) -> bool:
        return self.zygote.alive()


class MonitorPool:
    """Monitors launched ahead of time (see the module docstring). Thread-safe.

    ``zygote``: fork monitors from one pre-imported process (default); else keep ``size``
    interpreters started ahead."""

    def __init__(self, size: int = WARM_MONITORS, *, zygote: bool = True) -> None:
        self.size = size
        self.use_zygote = zygote
        self._zygote: MonitorZygote | None = None
        self._ready: deque[MonitorLaunch] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._refills: list[threading.Thread] = []

    def _live_zygote(self) -> MonitorZygote | None:
        """The zygote, started (again) if needed; None if it cannot be, or is not wanted."""
        with self._lock:
            if not self.use_zygote or self._closed:
                return None
            if self._zygote is not None and self._zygote.alive():
                return self._zygote
            stale, self._zygote = self._zygote, None
        if stale is not None:
            stale.close()
        try:
            made = MonitorZygote()
        except EngineError as exc:
            log.warning("%s; starting monitors as interpreters instead", exc)
            return None
        with self._lock:
            if self._closed or self._zygote is not None:
                extra = made
            else:
                self._zygote = made
                return made
        extra.close()
        return self._zygote

    def take(self) -> MonitorLaunch | ZygoteLaunch:
        """A start through the zygote; else a waiting monitor, or one started now if none is
        ready (see :meth:`replenish`)."""
        zygote = self._live_zygote()
        if zygote is not None:
            return ZygoteLaunch(zygote)
        with self._lock:
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.usable():
                    return candidate
                candidate.abort()
        return launch_monitor()

    def replenish(self) -> None:
        """Start a spare in the background. Called after a start completed, so the spare's
        start-up does not take CPU from the start that just took one."""
        if self.use_zygote and self._live_zygote() is not None:
            return
        with self._lock:
            self._refills = [t for t in self._refills if t.is_alive()]
            if self._closed or self.size <= 0 or len(self._ready) + len(self._refills) >= self.size:
                return
            t = threading.Thread(target=self._refill, name="tidal-monitor-pool", daemon=True)
            self._refills.append(t)
            t.start()

    def _refill(self) -> None:
        with self._lock:
            if self._closed or len(self._ready) >= self.size:
                return
        try:
            launch = launch_monitor()
        except OSError as exc:
            log.warning("starting a spare container monitor failed: %s", exc)
            return
        with self._lock:
            if self._closed or len(self._ready) >= self.size:
                stale = launch
            else:
                self._ready.append(launch)
                return
        stale.abort()

    def close(self) -> None:
        """End the waiting monitors (EOF on their stdin)."""
        with self._lock:
            self._closed = True
            ready, self._ready = list(self._ready), deque()
            refills = list(self._refills)
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
        for t in refills:
            t.join()
        with self._lock:
            ready += list(self._ready)
            self._ready.clear()
        for launch in ready:
            launch.abort()


def package_root() -> str:
    """The directory holding the ``tidal`` package, so the monitor imports this same code."""
    import tidal

    return str(Path(tidal.__file__).resolve().parent.parent)


def launch_monitor() -> MonitorLaunch:
    """Start a monitor's interpreter now; it waits for its configuration on stdin."""
    r, w = os.pipe()
    try:
        proc = tidal_proc.spawn(
            [sys.executable, "-S", "-m", "tidal.engine.monitor", "-", str(w)],
            what="starting a container monitor",
            error=EngineError,
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


def hand_over(conf: MonitorConfig, launch: MonitorLaunch | ZygoteLaunch) -> StartReport:
    """Give ``conf`` to a (pre-launched or forked) monitor and wait for its start report.

    ``monitor.json`` keeps the configuration next to the container, for debugging."""
    cdir = Path(conf.cdir)
    raw = conf.to_json()
    write_json_atomic(cdir / "monitor.json", raw)
    fail = StartReport("failed", conf.start_seq, 0)
    if isinstance(launch, ZygoteLaunch):
        r, w = os.pipe()
        try:
            launch.zygote.fork(json.dumps(raw).encode(), w)
        except EngineError as exc:
            os.close(r)
            log.warning("%s; starting container %s's monitor as an interpreter", exc, conf.id[:12])
            launch = launch_monitor()
        else:
            return _await_report(conf, r, fail)
        finally:
            os.close(w)
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
    return _report_of(conf, line, fail)


def _await_report(conf: MonitorConfig, ready_r: int, fail: StartReport) -> StartReport:
    try:
        line = read_line(ready_r, MONITOR_READY_TIMEOUT_S)
    except OSError as exc:
        return StartReport(**{**fail.to_json(), "error": f"reading the monitor's report: {exc}"})
    finally:
        os.close(ready_r)
    return _report_of(conf, line, fail)


def _report_of(conf: MonitorConfig, line: str, fail: StartReport) -> StartReport:
    cdir = Path(conf.cdir)
    if not line:
        try:
            tail = (cdir / "monitor.log").read_text(errors="replace").strip()[-1000:]
        except OSError:
            tail = ""
        return StartReport(
            **{**fail.to_json(), "error": f"monitor exited without a report: {tail or 'no log'}"}
        )
    return StartReport.from_json(json.loads(line))
