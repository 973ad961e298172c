"""SIGKILL the real daemon at random points while ``tidal run -d`` calls are in flight, restart
it, and check that every record agrees with the runtime's view and nothing leaks.

Found before the start report was recorded by the monitor: records left ``created`` with pid 0
while runc ran the container (4 of 32 kills). Each round starts three ``run -d`` CLI calls (one
on the bridge network), kills the daemon after a random delay, restarts it (which reconciles)
and compares the API's records with ``runc state``; then removes everything through the API.
The fixture's cleanup checks for leaked mounts, loop devices, cgroups and namespaces.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.engine.containers import Engine
from tidal.engine.runtime import RuncRuntime
from tidal.engine.settings import EngineSettings
from tidal.errors import DaemonUnavailableError, TidalError
from tidal.testing.daemon import daemon_env, start_daemon

ROUNDS = 16
BUDGET_S = 300.0
"""The whole test stops starting rounds after this long (at least 8 rounds are required)."""


def _run_d(settings: EngineSettings, image: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tidal.cli.main",
            "run",
            "-d",
            *extra,
            str(image),
            "--",
            "sleep",
            "300",
        ],
        env=daemon_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _disagreements(client: EngineClient, runc: RuncRuntime) -> list[str]:
    bad = []
    recs = client.list_all()
    for rec in recs:
        st = runc.state(rec.id)
        view = st.status if st else "unknown"
        if rec.status == "running":
            if view != "running" or (st is not None and st.pid != rec.pid):
                bad.append(f"{rec.name}: recorded running pid {rec.pid}, runtime {view} {st}")
        elif view in ("created", "running"):
            bad.append(f"{rec.name}: recorded {rec.status} pid {rec.pid}, runtime {view}")
    known = {r.id for r in recs}
    bad += [
        f"runtime container {cid[:12]} has no record" for cid in runc.list_ids() if cid not in known
    ]
    return bad


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.loop
@pytest.mark.netns
@pytest.mark.slow
def test_sigkilled_daemon_during_runs_is_reconciled(
    engine_settings: EngineSettings,
    busybox_rootfs: Path,
    tmp_path: Path,
    engine_cleanup: Callable[[Engine], None],
) -> None:
    seed = int(os.environ.get("TIDAL_TEST_SEED", time.time()))
    rng = random.Random(seed)
    log = tmp_path / "daemon.log"
    runc = RuncRuntime(engine_settings.resolved_state_dir() / "runtime" / "runc")
    started = time.monotonic()
    rounds = 0
    proc = start_daemon(engine_settings, log, timeout_s=90)
    try:
        while rounds < ROUNDS and time.monotonic() - started < BUDGET_S:
            calls = [
                _run_d(engine_settings, busybox_rootfs),
                _run_d(engine_settings, busybox_rootfs, "--network", "bridge"),
                _run_d(engine_settings, busybox_rootfs),
            ]
            time.sleep(rng.uniform(0.3, 1.6))  # interpreter start-up of the CLI is ~0.4 s
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for c in calls:
                try:
                    c.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
            proc = start_daemon(engine_settings, log, timeout_s=90)
            rounds += 1
            with EngineClient(engine_settings.resolved_socket_path()) as client:
                bad = _disagreements(client, runc)
                assert not bad, f"round {rounds} (seed {seed}): {bad}"
                for rec in client.list_all():
                    client.remove(rec.id, force=True)
                assert client.list_all() == []
        assert rounds >= 8, f"only {rounds} rounds within {BUDGET_S:.0f}s"
        folded = log.read_text().count("while no daemon recorded it")
        print(f"{rounds} kills (seed {seed}); starts in flight folded in on restart: {folded}")
    finally:
        with EngineClient(engine_settings.resolved_socket_path()) as c:
            try:
                for rec in c.list_all():
                    c.remove(rec.id, force=True)
            except (DaemonUnavailableError, TidalError):
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine_cleanup(Engine(engine_settings))
