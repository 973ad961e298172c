"""The five Tidal services, each a real server (loopback or unix socket): every one answers
/healthz and /metrics with its named metrics, and errors in one identical shape."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidal.blobs.p2p import RootServer
from tidal.blobs.peer import PeerServer
from tidal.engine.daemon import engine_service
from tidal.errors import ContainerStateError, OciRuntimeError
from tidal.ids import Digest
from tidal.qos.api import ApiServer
from tidal.qos.metrics import QosMetrics
from tidal.sched.extender import ExtenderServer, ViewStore
from tidal.service.server import UnixServiceServer


@dataclass
class _Rec:
    status: str

    def to_json(self) -> dict[str, str]:
        return {"status": self.status}


class FakeEngine:
    """What the daemon's HTTP layer calls of an Engine, without containers."""

    def list_all(self) -> list[_Rec]:
        return [_Rec("running"), _Rec("running"), _Rec("exited")]

    def describe(self, rec: _Rec) -> dict[str, str]:
        return {"status": rec.status}

    def run(self, spec: object) -> _Rec:
        if getattr(spec, "name", None) == "broken":
            raise OciRuntimeError("runc create failed: no such file /bin/true")
        return _Rec("running")

    def stop(self, ref: str, timeout_s: float | None = None) -> _Rec:
        return _Rec("exited")

    def remove(self, ref: str, force: bool = False) -> None:
        raise ContainerStateError(
            f"container {ref} is running; stop it or use 'tidal rm --force {ref}'"
        )


class _Layer:
    """Stands in for a cached layer source: the requests below never reach its bytes."""

    size_bytes = 1 << 20


class FakeAgent:
    """A StatusProvider: the QoS API needs nothing more of the agent."""

    problem: str | None = None

    def status(self) -> dict[str, Any]:
        return {"rounds": 1}

    def profiles(self) -> dict[str, Any]:
        return {}

    def adjustments(self) -> dict[str, Any]:
        return {"active": {}, "history": []}

    def rules_doc(self) -> dict[str, Any]:
        return {}

    def events(self) -> list[dict[str, Any]]:
        return []

    def dry_run_doc(self) -> dict[str, Any]:
        return {}

    def report_latency(self, app: str, p95_ms: float) -> None:
        pass

    def health_problem(self) -> str | None:
        return self.problem


@dataclass
class Running:
    client: httpx.Client
    metrics: tuple[str, ...]
    """Metric families that /metrics must declare."""
    post: str
    """A POST route that takes a JSON body."""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Running]]:
    agent = FakeAgent()
    qos = ApiServer(agent, "127.0.0.1", 0, QosMetrics().registry)
    qos.start()
    engine_sock = str(tmp_path / "engine.sock")
    engine = UnixServiceServer(engine_sock, engine_service(FakeEngine())).start()  # type: ignore[arg-type]
    extender = ExtenderServer(ViewStore(), "127.0.0.1", 0).start()
    root = RootServer("127.0.0.1", 0).start()
    layer = Digest("sha256:" + "ab" * 32)
    peer = PeerServer({layer: _Layer()}, "127.0.0.1", 0).start()  # type: ignore[dict-item]
    host, port = qos.address
    clients = {
        "engine daemon": Running(
            httpx.Client(transport=httpx.HTTPTransport(uds=engine_sock), base_url="http://tidal"),
            (
                "tidal_engine_containers",
                "tidal_engine_container_starts",
                "tidal_engine_container_stops",
                "tidal_engine_container_start_seconds",
            ),
            "/v1/containers",
        ),
        "QoS API": Running(
            httpx.Client(base_url=f"http://{host}:{port}"),
            ("tidal_qos_node_healthy", "tidal_qos_node_cpu_busy_cores"),
            "/v1/signals/latency",
        ),
        "extender": Running(
            httpx.Client(base_url=extender.url),
            ("tidal_sched_extender_decisions", "tidal_sched_extender_filtered_nodes"),
            "/filter",
        ),
        "P2P root": Running(
            httpx.Client(base_url=root.url),
            ("tidal_p2p_root_layers", "tidal_p2p_root_members", "tidal_p2p_root_changes"),
            "/v1/layers/sha256:" + "ab" * 32 + "/join",
        ),
        "P2P peer": Running(
            httpx.Client(base_url=peer.url),
            ("tidal_p2p_loops_refused",),  # served bytes/requests: by layer, once served
            "/v1/blobs/sha256:" + "ab" * 32,
        ),
    }
    try:
        yield clients
    finally:
        for r in clients.values():
            r.client.close()
        for s in (engine, extender, root, peer):
            s.stop()
        qos.stop()


def test_every_service_answers_healthz_and_metrics(fleet: dict[str, Running]) -> None:
    for name, r in fleet.items():
        health = r.client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"}), name
        text = r.client.get("/metrics").text
        for family in (*r.metrics, "tidal_http_requests", "tidal_http_request_seconds"):
            assert re.search(f"^# TYPE {family}(_total)? ", text, re.M), f"{name}: no {family}"
        assert 'route="healthz"' in text, name  # the kit counted the health request
    engine_metrics = fleet["engine daemon"].client.get("/metrics").text
    assert 'tidal_engine_containers{state="running"} 2.0' in engine_metrics
    assert 'tidal_engine_containers{state="exited"} 1.0' in engine_metrics


def test_error_shape_is_identical_across_services(fleet: dict[str, Running]) -> None:
    shapes = {}
    for name, r in fleet.items():
        missing = r.client.get("/no/such/route")
        assert missing.status_code == 404, name
        body = missing.json()
        assert set(body["error"]) == {"type", "message"}, name
        assert body["error"]["type"] == "NotFoundError", name
        method = "GET" if name == "P2P peer" else "POST"
        bad = r.client.request(method, r.post, content=b"{not json", headers={"Range": "x"})
        assert bad.status_code == 400, f"{name}: {bad.text}"
        err = bad.json()["error"]
        assert set(err) == {"type", "message"} and err["type"] == "ConfigError", name
        shapes[name] = sorted(k for k in body if k != "Error")  # the extender's protocol field
    assert set(map(tuple, shapes.values())) == {("error",)}
    # the extender keeps kube-scheduler's Error field beside it
    ext = fleet["extender"].client.post("/filter", content=b"[]").json()
    assert ext["Error"] == ext["error"]["message"]


def test_a_failing_health_check_fails_healthz(fleet: dict[str, Running], tmp_path: Path) -> None:
    extender = ExtenderServer(ViewStore(), "127.0.0.1", 0).start()
    try:
        extender.health_checks.append(lambda: "the controller has not synced for 300 s")
        with httpx.Client(base_url=extender.url) as c:
            for path in ("/healthz", "/scheduler/healthz"):  # any urlPrefix
                r = c.get(path)
                assert r.status_code == 503
                assert r.json() == {
                    "status": "failing",
                    "problems": ["the controller has not synced for 300 s"],
                }
    finally:
        extender.stop()


def test_cli_prints_the_daemon_error_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tidal.cli.main import main

    sock = tmp_path / "engine.sock"
    server = UnixServiceServer(str(sock), engine_service(FakeEngine())).start()  # type: ignore[arg-type]
    monkeypatch.setenv("TIDAL_ENGINE__SOCKET_PATH", str(sock))
    monkeypatch.setenv("COLUMNS", "300")
    try:
        with pytest.raises(SystemExit) as info:
            main(["rm", "web"])
    finally:
        server.stop()
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: container web is running; stop it or use 'tidal rm --force web'"]


def test_mount_metrics_from_the_fuse_counters() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from tidal.blockdev.fuse_ll import IoCounters, ReadLatency
    from tidal.blockdev.serve import MountMetrics, Served

    class Device:
        size_bytes, readonly = 1 << 20, True

    class Disk:  # what a FuseDisk exposes after serving three 4 KiB reads
        counters = IoCounters(reads=3, bytes_read=3 * 4096)
        read_latency = ReadLatency()

    for _ in range(3):
        Disk.read_latency.observe(0.0003)
    registry = CollectorRegistry()
    registry.register(MountMetrics(Disk(), Served(Device()), "/srv/img"))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'tidal_mount_reads_total{image="/srv/img"} 3.0' in text
    assert 'tidal_mount_read_bytes_total{image="/srv/img"} 12288.0' in text
    assert 'tidal_mount_read_seconds_count{image="/srv/img"} 3.0' in text
    assert 'tidal_mount_read_seconds_bucket{image="/srv/img",le="+Inf"} 3.0' in text
    assert 'tidal_mount_read_seconds_bucket{image="/srv/img",le="0.0001"} 0.0' in text
    assert "tidal_mount_fetched_bytes" not in text  # a local image fetches nothing


def test_root_and_peer_json_errors_keep_their_meaning(fleet: dict[str, Running]) -> None:
    bad = fleet["P2P root"].client.post(
        "/v1/layers/sha256:" + "ab" * 32 + "/join", json={"node": "nope"}
    )
    assert bad.status_code == 400 and "http(s) URL" in bad.json()["error"]["message"]
    peer = fleet["P2P peer"].client.get(
        "/v1/blobs/sha256:" + "cd" * 32, headers={"Range": "bytes=0-1"}
    )
    assert peer.status_code == 404 and json.loads(peer.text)["error"]["type"] == "BlobNotFoundError"


def test_engine_metrics_count_starts_stops_and_start_latency(tmp_path: Path) -> None:
    sock = str(tmp_path / "engine.sock")
    server = UnixServiceServer(sock, engine_service(FakeEngine())).start()  # type: ignore[arg-type]
    transport = httpx.HTTPTransport(uds=sock)
    try:
        with httpx.Client(transport=transport, base_url="http://tidal") as c:
            spec = {"image": "/srv/img", "command": ["true"]}
            assert c.post("/v1/containers", json={"spec": spec}).status_code == 201
            broken = c.post("/v1/containers", json={"spec": {**spec, "name": "broken"}})
            assert broken.status_code == 500 and broken.json()["error"]["type"] == "OciRuntimeError"
            assert c.post("/v1/containers/web/stop", json={"timeout_s": 1}).json() == {
                "status": "exited"
            }
            text = c.get("/metrics").text
    finally:
        server.stop()
    assert 'tidal_engine_container_starts_total{result="ok"} 1.0' in text
    assert 'tidal_engine_container_starts_total{result="error"} 1.0' in text
    assert 'tidal_engine_container_stops_total{how="stop",result="ok"} 1.0' in text
    assert 'tidal_engine_container_stops_total{how="kill",result="ok"} 0.0' in text
    assert "tidal_engine_container_start_seconds_count 1.0" in text  # only the start that worked


def test_qos_healthz_follows_the_agent(fleet: dict[str, Running]) -> None:
    client = fleet["QoS API"].client
    assert client.get("/healthz").status_code == 200
    FakeAgent.problem = "the last round failed: CgroupError: cpu.max is gone"
    try:
        r = client.get("/healthz")
    finally:
        FakeAgent.problem = None
    assert r.status_code == 503 and r.json()["problems"] == [
        "the last round failed: CgroupError: cpu.max is gone"
    ]
