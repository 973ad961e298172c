from __future__ import annotations

from pathlib import Path

import pytest

from tidal.qos.collector import Collector, NodeProbe, judge_health
from tidal.testing.cgroups import FakeCgroupV1Fs
from tidal.testing.clock import FakeClock
from tidal.testing.qos import FakeNodeProbe


def test_rates_between_samples(fs: FakeCgroupV1Fs) -> None:
    clock = FakeClock()
    c = Collector(fs, FakeNodeProbe(), clock=clock)
    first = c.collect(["batch/etl", "gone"])
    assert first.containers["batch/etl"].cpu_cores is None  # no rate on the first sample
    assert "gone" in first.errors
    clock.advance(2.0)
    fs.set_usage(
        "batch/etl",
        cpu_usage_ns=3_000_000_000,
        memory_bytes=5 << 20,
        throttled=(20, 5, 400_000_000),
    )
    m = c.collect(["batch/etl"]).containers["batch/etl"]
    assert m.cpu_cores == pytest.approx(1.5)
    assert m.throttled_ratio == pytest.approx(0.25)
    assert m.throttled_s_per_s == pytest.approx(0.2)
    assert m.memory_usage_bytes == 5 << 20


def _fake_proc(root: Path, idle: int) -> None:
    (root / "stat").write_text(f"cpu  100 0 100 {idle} 0 0 0 0 0 0\n")
    (root / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 250 kB\n")
    (root / "loadavg").write_text("0.50 0.40 0.30 1/80 123\n")


def test_node_probe_health_signals(tmp_path: Path) -> None:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    net = sys_root / "class/net"
    for name, state in (("lo", "unknown"), ("eth0", "down")):
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(state + "\n")
    _fake_proc(proc, 1000)
    probe = NodeProbe(proc, sys_root, disk_probe_dir=tmp_path / "data")
    n = probe.sample(1.0)
    assert n.memory_total_bytes == 1000 * 1024 and n.load1 == 0.5
    assert n.pressure is None  # no /proc/pressure in the fake: PSI degrades to None
    assert not n.net_ok and "no interface besides lo" in n.problems[0]
    assert n.disk_ok
    (net / "eth0" / "operstate").write_text("up\n")
    _fake_proc(proc, 1100)  # 100 idle of 100 ticks more... busy 0
    assert probe.sample(2.0).net_ok
    (tmp_path / "ro").write_text("a file where a directory should be")
    bad = NodeProbe(proc, sys_root, disk_probe_dir=tmp_path / "ro", required_interfaces=("lo",))
    n = bad.sample(3.0)
    assert not n.disk_ok and n.net_ok
    assert judge_health(n, 3.0, 5.0).reasons[0].startswith("disk fault")


def test_health_stale_and_missing() -> None:
    node = FakeNodeProbe().sample(10.0)
    assert judge_health(node, 12.0, 5.0).ok
    h = judge_health(node, 20.0, 5.0)
    assert not h.ok and "stale" in h.reasons[0]
    assert not judge_health(None, 0.0, 5.0).ok
