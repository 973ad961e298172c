"""The QoS agent on real engine containers: found by label through the daemon's API, their real
cgroups suppressed while the online service breaks its SLO, and restored afterwards.

The agent does not import the engine (import-linter enforces it); it reads ``GET /v1/containers``
on the daemon's socket, so this test is the contract between the two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.engine.daemon import Daemon
from tidal.engine.spec import ContainerSpec
from tidal.qos.agent import Agent
from tidal.qos.settings import QosSettings

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop]

BUSY = "while :; do :; done"
RULES = """
containers:
  - engine: {priority: online}
  - engine: {priority: offline}
    spec: {cpus: 2}
engine: {socket: SOCKET}
slo: {app: web, p95_latency_ms: 250}
policy: {type: slo_feedback, step_cores: 0.5, floor_cores: 0.25}
"""


def _cli_run(socket: Path, *args: str) -> str:
    """``tidal run -d ...`` as a user types it; returns the container id."""
    env = {**os.environ, "TIDAL_ENGINE__SOCKET_PATH": str(socket)}
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "run", "-d", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _rounds(agent: Agent, n: int, p95_ms: float) -> None:
    """``n`` real agent rounds, one per second, with the online service reporting ``p95_ms``."""
    for _ in range(n):
        agent.report_latency("web", p95_ms)
        agent.step()
        time.sleep(1.0)


def test_agent_throttles_labelled_engine_containers_and_restores_them(
    daemon: tuple[Daemon, EngineClient], busybox_image: Path, tmp_path: Path
) -> None:
    d, client = daemon
    socket = d.settings.resolved_socket_path()
    image = str(busybox_image)
    web = client.run(
        ContainerSpec(
            image=image,
            command=("sh", "-c", BUSY),
            name="web",
            labels=(("app", "web"), ("priority", "online")),
        )
    )
    batch_id = _cli_run(
        socket,
        "--name", "batch", "--cpus", "2", "--label", "priority=offline", "--label", "app=etl",
        image, "--", "sh", "-c", f"({BUSY}) & ({BUSY}) & wait",
    )  # fmt: skip
    bystander = client.run(ContainerSpec(image=image, command=("sleep", "600"), name="other"))
    listed = {name: client.inspect(name) for name in ("web", "batch", "other")}
    cgroups = {name: r["cgroup"].strip("/") for name, r in listed.items()}
    assert cgroups["batch"].endswith(batch_id) and listed["batch"]["spec"]["labels"] == [
        ["priority", "offline"],
        ["app", "etl"],
    ]

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("SOCKET", str(socket)))
    agent = Agent(
        QosSettings(rules_file=rules, state_dir=tmp_path / "qos", api_port=0, watchdog=False)
    )
    fs = agent.fs
    before = {name: fs.read_cpu(cg) for name, cg in cgroups.items()}
    assert before["batch"].quota_cores == pytest.approx(2.0)  # the engine set --cpus 2
    try:
        assert sorted(cg for cg, _ in agent.targets(agent.rules.current)) == sorted(
            [cgroups["web"], cgroups["batch"]]
        )
        _rounds(agent, 2, 100.0)  # online busy, inside its SLO: offline weight drops first
        assert fs.read_cpu(cgroups["batch"]).shares < before["batch"].shares
        _rounds(agent, 4, 400.0)  # SLO broken: offline quota goes to its floor
        squeezed = fs.read_cpu(cgroups["batch"]).quota_cores
        assert squeezed is not None and squeezed <= 0.5, squeezed
        # the kernel enforces it: the two busy loops now get about the floor, not 2 cores
        usage0 = fs.cpu_stats(cgroups["batch"]).usage_ns
        time.sleep(2.0)
        used = (fs.cpu_stats(cgroups["batch"]).usage_ns - usage0) / 2e9
        assert used < 0.7, f"offline used {used:.2f} cores under a {squeezed} core quota"
        assert fs.read_cpu(cgroups["other"]) == before["other"]  # unlabelled: never touched
        assert agent.status()["engine_error"] is None
        decision = agent.center.last_decision
        assert decision is not None and decision.health.ok, decision
    finally:
        problems = agent.stop()
    assert problems == []
    assert fs.read_cpu(cgroups["batch"]) == before["batch"]
    assert fs.read_cpu(cgroups["web"]) == before["web"]
    assert client.get(web.id).status == "running" and client.get(bystander.id).status == "running"
