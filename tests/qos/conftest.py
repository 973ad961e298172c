"""Fixtures for QoS tests: a fake cgroup tree, a fake node, a fake clock, rules on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.qos.agent import Agent
from tidal.qos.settings import QosSettings
from tidal.testing.cgroups import FakeCgroupV1Fs
from tidal.testing.clock import FakeClock
from tidal.testing.qos import FakeNodeProbe

RULES = """
version: 1
containers:
  - cgroup: shop/web
    labels: {app: web, priority: online}
  - cgroup: batch/etl
    labels: {app: etl, priority: offline}
slo: {app: web, p95_latency_ms: 250}
policy: {type: slo_feedback, step_cores: 0.25, floor_cores: 0.25}
rules:
  - {type: memory_guard}
guards: {drift_limit_s: 30, scale_out_after_s: 10}
"""


@pytest.fixture
def fs(tmp_path: Path) -> FakeCgroupV1Fs:
    fs = FakeCgroupV1Fs(tmp_path / "cgroup")
    for cg in ("shop/web", "batch/etl"):
        fs.create(cg)
    return fs


@pytest.fixture
def rules_path(tmp_path: Path) -> Path:
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return p


@pytest.fixture
def agent(tmp_path: Path, fs: FakeCgroupV1Fs, rules_path: Path) -> Iterator[Agent]:
    settings = QosSettings(
        rules_file=rules_path, state_dir=tmp_path / "state", api_port=0, watchdog=False
    )
    a = Agent(settings, fs=fs, node_probe=FakeNodeProbe(), clock=FakeClock())
    try:
        yield a
    finally:
        a.stop()
