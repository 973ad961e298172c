"""Run ``tidal daemon`` as a child process on given engine settings (real-daemon tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tidal.engine.client import EngineClient
from tidal.engine.settings import EngineSettings
from tidal.errors import DaemonUnavailableError


def daemon_env(settings: EngineSettings) -> dict[str, str]:
    """The environment that gives a ``tidal`` child process these engine settings."""
    env = dict(os.environ)
    env.update(
        {
            "TIDAL_ENGINE__STATE_DIR": str(settings.state_dir),
            "TIDAL_ENGINE__DEFAULT_DISK_QUOTA_BYTES": str(settings.default_disk_quota_bytes),
            "TIDAL_ENGINE__CGROUP_PARENT": settings.cgroup_parent,
            "TIDAL_ENGINE__BRIDGE": settings.bridge,
            "TIDAL_ENGINE__SUBNET": settings.subnet,
            "TIDAL_ENGINE__LXCFS": "off",
            "TIDAL_ENGINE__STOP_TIMEOUT_S": "1",
        }
    )
    return env


def start_daemon(
    settings: EngineSettings, log: Path, timeout_s: float = 20
) -> subprocess.Popen[bytes]:
    """``tidal daemon`` in a child on ``settings``; returns once it answers a ping.

    ``timeout_s``: reconciliation after a kill may wait for starts in flight."""
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidal.cli.main", "daemon"],
            env=daemon_env(settings),
            stdout=fh,
            stderr=fh,
        )
    sock = settings.resolved_socket_path()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited at start: {log.read_text()[-2000:]}")
        if sock.exists():
            with EngineClient(sock) as c:
                try:
                    c.ping()
                    return proc
                except DaemonUnavailableError:
                    pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"daemon did not come up: {log.read_text()[-2000:]}")
