"""A harness for the node service: ``tidal node serve`` as a subprocess with its own data root.

Tests start it, kill it (SIGKILL, or SIGTERM as an upgrade's stop would) and start it again,
and :meth:`NodeProcess.close` leaves nothing behind: every mount it served unmounted, the
service stopped and the fd store's holder ended (the holder outlives the service by design).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tidal.blockdev import mounts
from tidal.blockdev.fdstore import FdStore
from tidal.errors import TidalError
from tidal.node.client import NodeClient, running_node

START_TIMEOUT_S = 30.0


class NodeProcess:
    """``tidal node serve`` with ``TIDAL_DATA_ROOT=data_root``; :meth:`cli` runs a command
    in the same environment."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        self.env = {**os.environ, "TIDAL_DATA_ROOT": str(data_root)}
        self.socket = data_root / "node.sock"
        self.log = data_root / "node-test.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the node service was not started"
        return self.proc.pid

    def start(self) -> NodeProcess:
        self.data_root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # a long-lived child the harness holds, killed and restarted by tests
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidal.cli.main", "node", "serve"],
                env=self.env, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while (client := running_node(self.socket)) is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node service exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node service did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.05)
        client.close()
        return self

    def client(self) -> NodeClient:
        return NodeClient(self.socket)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", *args],
            env=self.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"tidal {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def close(self) -> list[str]:
        """Unmount everything, stop the service and the fd store's holder; returns the names
        the fd store still held (a test that expects none asserts on it)."""
        if self.proc is not None and self.proc.poll() is None:
            for m in mounts.list_mounts():
                with contextlib.suppress(TidalError), self.client() as c:
                    c.unmount(m.target, force=True)
            self.kill(signal.SIGTERM)
        for m in mounts.list_mounts():
            with contextlib.suppress(TidalError):
                mounts.unmount(m.target, force=True)
        store = FdStore(self.data_root / "fdstore.sock")
        names: list[str] = []
        if store.alive():
            names = store.names()
            with contextlib.suppress(ProcessLookupError):
                os.kill(store.holder_pid(), signal.SIGTERM)
        return names
