from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

from tidal.cgroups import CpuLimits
from tidal.errors import QosError
from tidal.qos.agent import Agent
from tidal.qos.settings import QosSettings
from tidal.testing.cgroups import FakeCgroupV1Fs
from tidal.testing.clock import FakeClock
from tidal.testing.qos import FakeNodeProbe


def run(
    agent: Agent, fs: FakeCgroupV1Fs, seconds: int, web: float, etl: float, p95: float | None
) -> None:
    """Advance the fake clock second by second with the given CPU use and latency."""
    clock = agent.clock
    assert isinstance(clock, FakeClock)
    for _ in range(seconds):
        clock.advance(1.0)
        for cg, cores in (("shop/web", web), ("batch/etl", etl)):
            usage = fs.cpu_stats(cg).usage_ns + int(cores * 1e9)
            fs.set_usage(cg, cpu_usage_ns=usage)
        if p95 is not None:
            agent.report_latency("web", p95)
        agent.step()


def test_agent_tightens_offline_under_slo_pressure_and_restores_after(
    agent: Agent, fs: FakeCgroupV1Fs
) -> None:
    run(agent, fs, 2, 0.8, 1.2, 100.0)
    assert fs.read_cpu("batch/etl").shares == 2  # weight suppressed while online runs
    assert fs.read_cpu("batch/etl").quota_us is None
    run(agent, fs, 3, 0.8, 1.2, 300.0)
    q = fs.read_cpu("batch/etl").quota_cores
    assert q is not None and q < 2.0
    assert "batch/etl" in agent.executor.journal.entries
    run(agent, fs, 20, 0.0, 1.2, 20.0)  # online idle and fast: back to the spec
    assert fs.read_cpu("batch/etl") == CpuLimits()
    assert agent.executor.journal.entries == {}


def test_unhealthy_node_makes_no_change(agent: Agent, fs: FakeCgroupV1Fs) -> None:
    probe = agent.collector.node_probe
    assert isinstance(probe, FakeNodeProbe)
    probe.problems = ["disk fault: cannot write /var/lib/tidal/qos/.qos-disk-probe: I/O error"]
    run(agent, fs, 3, 0.8, 1.2, 400.0)
    assert fs.read_cpu("batch/etl") == CpuLimits()
    d = agent.center.last_decision
    assert d is not None and not d.health.ok and "disk fault" in d.health.reasons[0]
    assert [e.kind for e in agent.center.events].count("unhealthy") == 1


def test_stale_latency_is_ignored(agent: Agent, fs: FakeCgroupV1Fs) -> None:
    agent.report_latency("web", 900.0)
    assert isinstance(agent.clock, FakeClock)
    agent.clock.advance(10)  # older than guards.latency_max_age_s (5 s)
    run(agent, fs, 3, 0.8, 1.2, None)
    assert fs.read_cpu("batch/etl").shares == 2  # online runs: weight still suppressed
    assert fs.read_cpu("batch/etl").quota_us is None


def test_drift_escalation_and_scale_out_events(agent: Agent, fs: FakeCgroupV1Fs) -> None:
    run(agent, fs, 40, 0.8, 1.2, 400.0)  # SLO broken all along; offline squeezed to the floor
    kinds = [e.kind for e in agent.center.events]
    assert kinds.count("scale_out") == 1
    assert "escalation" in kinds
    esc = next(e for e in agent.center.events if e.kind == "escalation")
    assert esc.subject == "batch/etl" and "vertical autoscaler" in esc.message


def test_restart_adopts_or_restores(tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path) -> None:
    settings = QosSettings(
        rules_file=rules_path, state_dir=tmp_path / "state", api_port=0, watchdog=False
    )
    a = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    run(a, fs, 4, 0.8, 1.2, 300.0)
    tightened = fs.read_cpu("batch/etl")
    assert tightened != CpuLimits()
    a.stop(handover=True)
    assert fs.read_cpu("batch/etl") == tightened
    b = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    b.recover("adopt")
    assert "batch/etl" in b.executor.journal.entries and fs.read_cpu("batch/etl") == tightened
    b.stop()  # a normal stop restores the spec
    assert fs.read_cpu("batch/etl") == CpuLimits()
    c = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    run(c, fs, 4, 0.8, 1.2, 300.0)
    c.executor.journal.save("running")  # as if c died; d starts in restore mode
    d = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    d.recover("restore")
    assert fs.read_cpu("batch/etl") == CpuLimits()
    assert any(e.kind == "restore" for e in d.center.events)


def test_rules_hot_reload_switches_policy(
    agent: Agent, fs: FakeCgroupV1Fs, rules_path: Path
) -> None:
    run(agent, fs, 2, 0.5, 1.5, 50.0)
    text = rules_path.read_text().replace(
        "policy: {type: slo_feedback, step_cores: 0.25, floor_cores: 0.25}",
        "policy: {type: utilisation_budget, threshold: 0.6, floor_cores: 0.1}",
    )
    rules_path.write_text(text)
    os.utime(rules_path, ns=(5, 5))
    run(agent, fs, 2, 0.5, 1.5, 50.0)
    # 2 x 0.6 - 0.5 online - system max(0, 0.5 - 2.0) = 0.7 cores
    assert fs.read_cpu("batch/etl").quota_cores == pytest.approx(0.7)
    rules_path.write_text("policy: [broken\n")
    os.utime(rules_path, ns=(6, 6))
    run(agent, fs, 1, 0.5, 1.5, 50.0)
    assert (
        agent.rules.current.policy is not None
        and agent.rules.current.policy.name == "utilisation_budget"
    )
    assert any(e.kind == "rules" and "rejected" in e.message for e in agent.center.events)


def test_http_api_and_metrics(tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path) -> None:
    settings = QosSettings(
        rules_file=rules_path,
        state_dir=tmp_path / "state",
        api_port=0,
        watchdog=False,
        interval_s=0.05,
    )
    agent = Agent(settings, fs=fs, node_probe=FakeNodeProbe())
    agent.start()
    try:
        assert agent.api_address is not None
        host, port = agent.api_address
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as c:
            assert c.post("/v1/signals/latency", json={"app": "web", "p95_ms": 400}).json() == {
                "ok": True
            }
            dry = c.post("/v1/dry-run").json()
            assert dry["healthy"] is True
            assert {t["cgroup"] for t in dry["targets"]} == {"batch/etl"}
            status = c.get("/v1/status").json()
            assert status["policy"] == "slo_feedback" and status["cgroup_version"] == 1
            assert c.get("/v1/rules").json()["rules"]["slo"]["p95_latency_ms"] == 250
            import time

            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not agent.executor.history:
                agent.report_latency("web", 400)
                time.sleep(0.05)
            adj = c.get("/v1/adjustments").json()
            assert adj["history"] and adj["history"][0]["before"]["cpu"]["shares"] == 1024
            assert "batch/etl" in c.get("/v1/profiles").json()
            assert isinstance(c.get("/v1/events").json(), list)
            metrics = c.get("/metrics").text
            assert 'tidal_qos_adjustments_total{cgroup="batch/etl",result="ok"}' in metrics
            assert 'tidal_qos_latency_p95_ms{app="web"} 400.0' in metrics
            bad = c.post("/v1/signals/latency", json={"app": "web"})
            assert bad.status_code == 400 and "p95_ms" in bad.json()["error"]["message"]
            assert c.get("/v1/nothing").status_code == 404
    finally:
        agent.stop()
    assert fs.read_cpu("batch/etl") == CpuLimits()


METRICS = """# HELP http_p95_seconds p95 latency
# TYPE http_p95_seconds gauge
http_p95_seconds{route="/"} 0.4
http_p95_seconds{route="/health"} 0.001
"""


def test_latency_scraped_from_prometheus_endpoint(
    tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path
) -> None:
    rules_path.write_text(
        rules_path.read_text()
        + 'signals:\n  - {app: web, prometheus_url: "http://svc/metrics", metric: http_p95_seconds,'
        + " labels: {route: /}, scale_to_ms: 1000}\n"
    )
    fetched: list[str] = []

    def fetch(url: str) -> str:
        fetched.append(url)
        return METRICS

    settings = QosSettings(rules_file=rules_path, state_dir=tmp_path / "state", watchdog=False)
    a = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock(), fetch=fetch)
    try:
        run(a, fs, 3, 0.8, 1.2, None)
        assert fetched == ["http://svc/metrics"] * 3
        assert a.status()["latency_p95_ms"] == {"web": 400.0}
        q = fs.read_cpu("batch/etl").quota_cores
        assert q is not None and q < 2.0  # 400 ms > SLO: tightened from the scraped value
    finally:
        a.stop()


def test_scrape_failure_is_reported_not_fatal(
    tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path
) -> None:
    from tidal.errors import QosError

    rules_path.write_text(
        rules_path.read_text()
        + 'signals:\n  - {app: web, prometheus_url: "http://svc/metrics", metric: missing_metric}\n'
    )

    def fetch(url: str) -> str:
        if "fail" in url:
            raise QosError("down")
        return METRICS

    settings = QosSettings(rules_file=rules_path, state_dir=tmp_path / "state", watchdog=False)
    a = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock(), fetch=fetch)
    try:
        run(a, fs, 1, 0.8, 1.2, None)
        assert "no sample missing_metric" in a.status()["scrape_errors"]["web"]
    finally:
        a.stop()


def test_wildcard_rules_cover_every_engine_container(tmp_path: Path, fs: FakeCgroupV1Fs) -> None:
    for cg in ("tidal/c1", "tidal/c2"):
        fs.create(cg)
    rules = tmp_path / "wild.yaml"
    rules.write_text(
        "containers:\n"
        "  - {cgroup: shop/web, labels: {app: web, priority: online}}\n"
        "  - {cgroup: 'tidal/*', labels: {app: batch, priority: offline}}\n"
        "slo: {app: web, p95_latency_ms: 250}\n"
        "policy: {type: slo_feedback}\n"
    )
    settings = QosSettings(rules_file=rules, state_dir=tmp_path / "state", watchdog=False)
    a = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    try:
        assert [cg for cg, _ in a.targets(a.rules.current)] == ["shop/web", "tidal/c1", "tidal/c2"]
        fs.set_usage("shop/web", cpu_usage_ns=0)
        a.step()
        assert isinstance(a.clock, FakeClock)
        a.clock.advance(1)
        fs.set_usage("shop/web", cpu_usage_ns=800_000_000)
        a.step()
        assert fs.read_cpu("tidal/c1").shares == 2 and fs.read_cpu("tidal/c2").shares == 2
    finally:
        a.stop()
    assert fs.read_cpu("tidal/c1").shares == 1024


def test_taken_api_port_is_a_clear_error_before_anything_starts(
    tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = QosSettings(
            rules_file=rules_path, state_dir=tmp_path / "state", api_port=port, watchdog=False
        )
        agent = Agent(settings, fs=fs, node_probe=FakeNodeProbe())
        with pytest.raises(QosError, match=f"cannot listen on 127.0.0.1:{port}: Address already"):
            agent.start()
        assert agent.stop() == []  # nothing was started; stop is harmless
