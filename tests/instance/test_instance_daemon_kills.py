"""Instances survive a SIGKILL of the real ``tidal daemon``; creations it interrupts are rolled
back on restart, so every instance is whole or gone and nothing is left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.settings import EngineSettings
from tidal.errors import DaemonUnavailableError, TidalError
from tidal.instance.client import InstanceClient
from tidal.instance.manager import LABEL_ID
from tidal.testing.daemon import daemon_env, start_daemon

from .conftest import assert_nothing_left, cleanup_engine, pod_cgroups

ROUNDS = 6
BUDGET_S = 150.0


def _instance_run(settings: EngineSettings, image: Path, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tidal.cli.main", "instance", "run", "--name", name,
         "--bandwidth", "20M", "--memory", "64M", "-c", f"side={image}:sleep 300",
         str(image), "--", "sleep", "300"],
        env=daemon_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _whole_or_gone(client: InstanceClient, settings: EngineSettings) -> list[str]:
    """Disagreements: an instance not fully running, a container or pod cgroup of none."""
    bad = []
    items = client.instances()
    ids = {d["id"] for d in items}
    for d in items:
        states = {c["member"]: c["status"] for c in d["containers"]}
        # runc: the sandbox is only created (no pause process), the others run
        if d["status"] != "running" or states != {
            "sandbox": "created",
            "main": "running",
            "side": "running",
        }:
            bad.append(f"instance {d['name']}: {d['status']} {states}")
    for rec in client.list_all():
        owner = dict(rec.spec.labels).get(LABEL_ID)
        if owner not in ids:
            bad.append(f"container {rec.name} belongs to no instance ({owner})")
    pods = {Path(p).name for p in pod_cgroups(settings)}
    known = {f"pod-{i[:12]}" for i in ids}
    bad += [f"pod cgroup {p} belongs to no instance" for p in pods - known]
    return bad


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.netns
@pytest.mark.loop
@pytest.mark.slow
def test_instances_survive_and_interrupted_creations_roll_back(
    engine_settings: EngineSettings, busybox_rootfs: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TIDAL_TEST_SEED", time.time()))
    rng = random.Random(seed)
    log = tmp_path / "daemon.log"
    sock = engine_settings.resolved_socket_path()
    proc = start_daemon(engine_settings, log, timeout_s=90)
    try:
        # a running instance outlives the daemon: same containers, pids and address
        with InstanceClient(sock) as client:
            t0 = time.monotonic()
            client_run = _instance_run(engine_settings, busybox_rootfs, "keep")
            assert client_run.wait(timeout=60) == 0
            one_run_s = time.monotonic() - t0  # CLI start-up plus the creation itself
            before = client.instance("keep")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start_daemon(engine_settings, log, timeout_s=90)
        with InstanceClient(sock) as client:
            after = client.instance("keep")
            assert after["status"] == "running" and after["ip"] == before["ip"]
            assert [(c["id"], c["pid"]) for c in after["containers"]] == [
                (c["id"], c["pid"]) for c in before["containers"]
            ]
            res = client.instance_exec("keep", ["hostname"], container="side")
            assert res.stdout == b"keep\n"
            client.remove_instance("keep", force=True)

        started, rounds = time.monotonic(), 0
        while rounds < ROUNDS and time.monotonic() - started < BUDGET_S:
            calls = [_instance_run(engine_settings, busybox_rootfs, f"k{rounds}{x}") for x in "ab"]
            # kill while the creations are in flight: after the CLI's start-up (most of a run
            # on a loaded machine), before they end
            time.sleep(rng.uniform(0.55, 1.05) * one_run_s)
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
            with InstanceClient(sock) as client:
                bad = _whole_or_gone(client, engine_settings)
                assert not bad, f"round {rounds} (seed {seed}): {bad}"
                for d in client.instances():
                    client.remove_instance(d["id"], force=True)
                assert client.list_all() == []
        assert rounds >= 4, f"only {rounds} rounds within {BUDGET_S:.0f}s"
        rolled = log.read_text().count("when the daemon stopped; removing it")
        print(f"{rounds} kills (seed {seed}); interrupted creations rolled back: {rolled}")
        assert_nothing_left(engine_settings)
    finally:
        with InstanceClient(sock) as c:
            try:
                for d in c.instances():
                    c.remove_instance(d["id"], force=True)
            except (DaemonUnavailableError, TidalError):
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        cleanup_engine(Engine(engine_settings))
