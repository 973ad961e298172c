"""Engine discovery without root: an HTTP server on a unix socket answering like the daemon.

The end-to-end test with the real engine daemon and real containers is
``test_qos_engine_e2e.py``; this one covers parsing, label matching and a daemon going away.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tidal.cgroups import CpuLimits
from tidal.errors import QosError
from tidal.qos.agent import Agent
from tidal.qos.discovery import EngineDiscovery, parse_containers
from tidal.qos.settings import QosSettings
from tidal.testing.cgroups import FakeCgroupV1Fs
from tidal.testing.clock import FakeClock
from tidal.testing.qos import FakeNodeProbe


def record(cid: str, status: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"n-{cid}",
        "status": status,
        "cgroup": f"/tidal/{cid}",
        "spec": {"image": "/img", "labels": [[k, v] for k, v in labels.items()]},
    }


class FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    payload: Any = None
    body: bytes | None = None


class Handler(BaseHTTPRequestHandler):
    server: FakeDaemon

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/v1/containers":
            self.send_error(404)
            return
        body = self.server.body or json.dumps(self.server.payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    server = FakeDaemon(str(tmp_path / "engine.sock"), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_parse_keeps_running_containers_and_rejects_garbage() -> None:
    found = parse_containers(
        [record("a", "running", {"app": "web"}), record("b", "exited", {})], "src"
    )
    assert [(c.id, c.cgroup, c.labels) for c in found] == [("a", "tidal/a", {"app": "web"})]
    with pytest.raises(QosError, match=r"src: container \[0\] is not an engine record"):
        parse_containers([{"id": "x"}], "src")
    with pytest.raises(QosError, match="unusable cgroup"):
        parse_containers([{**record("a", "running", {}), "cgroup": "/../etc"}], "src")
    with pytest.raises(QosError, match="expected a list"):
        parse_containers({"error": 1}, "src")


def test_discovery_keeps_the_last_list_when_the_daemon_goes_away(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    daemon.payload = [record("a", "running", {"priority": "online"})]
    d = EngineDiscovery(tmp_path / "engine.sock")
    try:
        assert [c.id for c in d.containers()] == ["a"] and d.last_error is None
        daemon.body = b"not json"
        assert [c.id for c in d.containers()] == ["a"]
        assert d.last_error is not None and "invalid JSON" in d.last_error
        daemon.body = None
        d.socket_path = tmp_path / "gone.sock"
        d.close()
        with pytest.raises(QosError, match=r"gone.sock is not reachable .*tidal daemon"):
            d.fetch()
        # a socket file left by a dead daemon: refused, no leaked socket (warnings are errors)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(tmp_path / "gone.sock"))
            with pytest.raises(QosError, match="refused"):
                d.fetch()
    finally:
        d.close()


def test_agent_adjusts_engine_containers_found_by_label(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.payload = [
        record("on1", "running", {"app": "web", "priority": "online"}),
        record("off1", "running", {"priority": "offline"}),
        record("off2", "exited", {"priority": "offline"}),
        record("other", "running", {"priority": "best-effort"}),
    ]
    fs = FakeCgroupV1Fs(tmp_path / "cgroup")
    for cid in ("on1", "off1", "other"):
        fs.create(f"tidal/{cid}")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""
containers:
  - engine: {{priority: online}}
  - engine: {{priority: offline}}
engine: {{socket: {tmp_path / "engine.sock"}}}
slo: {{app: web, p95_latency_ms: 250}}
policy: {{type: slo_feedback, step_cores: 0.25, floor_cores: 0.25}}
"""
    )
    settings = QosSettings(
        rules_file=rules, state_dir=tmp_path / "state", api_port=0, watchdog=False
    )
    agent = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    try:
        targets = dict(agent.targets(agent.rules.current))
        assert sorted(targets) == ["tidal/off1", "tidal/on1"]
        assert targets["tidal/on1"].labels == {"app": "web", "priority": "online"}
        clock = agent.clock
        assert isinstance(clock, FakeClock)
        for _ in range(4):
            clock.advance(1.0)
            for cg, cores in (("tidal/on1", 0.8), ("tidal/off1", 1.2)):
                fs.set_usage(cg, cpu_usage_ns=fs.cpu_stats(cg).usage_ns + int(cores * 1e9))
            agent.report_latency("web", 400.0)
            agent.step()
        assert fs.read_cpu("tidal/off1") != CpuLimits()
        assert fs.read_cpu("tidal/other") == CpuLimits()
        status = agent.status()
        assert status["engine_error"] is None and status["journal"] == ["tidal/off1"]
        assert {(w["container"], w["priority"]) for w in status["watched"]} == {
            ("n-on1", "online"),
            ("n-off1", "offline"),
        }
        # the throttled container is removed (its cgroup goes): the journal lets go of it
        daemon.payload = daemon.payload[:1]
        fs.remove("tidal/off1")
        agent.step()
        assert agent.executor.journal.entries == {}
        assert [w["container"] for w in agent.status()["watched"]] == ["n-on1"]
    finally:
        assert agent.stop() == []
