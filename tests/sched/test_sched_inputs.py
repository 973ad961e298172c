"""The inputs users have: request logs, pod event lists, replica series; their warnings."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.errors import ConfigError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.model import Resources
from tidal.sched.traces import (
    _occupancy,
    load_pod_events,
    load_replica_series,
    load_request_trace,
    pod_event_sample,
    write_pod_events,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 900)), min_size=1, max_size=30))
def test_occupancy_matches_a_second_by_second_model(items: list[tuple[float, float]]) -> None:
    starts = np.array([s for s, _ in items])
    ends = starts + np.array([d for _, d in items])
    got = _occupancy(starts, ends, 100)
    want = np.zeros(100)
    for s, e in zip(starts, ends, strict=True):
        for m in range(100):
            want[m] += max(0.0, min(e, (m + 1) * 60.0) - max(s, m * 60.0)) / 60.0
    assert got == pytest.approx(want, abs=1e-6)


def test_request_log_with_other_column_names(tmp_path: Path) -> None:
    log = tmp_path / "requests.csv"
    log.write_text(
        "ts,seconds,model\n"
        "2024-11-15T00:00:00Z,120,big\n"
        "1731628860,60,small\n"  # Unix seconds: 2024-11-15 00:01:00 UTC
    )
    t = load_request_trace(
        log, load_scale=1.0, time_column="ts", duration_column="seconds", split_by="model"
    )
    big, small = t.services
    assert (big.name, small.name) == ("big", "small")
    assert big.demand[:3].tolist() == pytest.approx([1, 1, 0])
    assert small.demand[:3].tolist() == pytest.approx([0, 1, 0])
    assert any("padded with zero demand" in w for w in t.warnings)
    with pytest.raises(ConfigError, match=r"no column 'gmt_create'"):
        load_request_trace(log)


def test_pod_event_sample_loads_with_shapes_and_gpus(tmp_path: Path) -> None:
    rows = pod_event_sample(seed=3, days=2)
    assert rows == pod_event_sample(seed=3, days=2)  # seeded
    t = load_pod_events(write_pod_events(rows, tmp_path / "pods.csv"))
    assert t.days == 2 and not t.warnings
    by_name = {s.name: s for s in t.services}
    assert set(by_name) == {"web", "api", "render"}
    assert by_name["render"].requests == Resources(4000, 16384, 1)
    assert by_name["web"].requests == Resources(2000, 4096)
    web = by_name["web"].demand.reshape(2, MINUTES_PER_DAY)
    assert web[:, 20 * 60].min() > 80 and web[:, 8 * 60].max() < 30  # the evening tide


def test_pod_events_by_shape_open_pods_and_bad_rows(tmp_path: Path) -> None:
    f = tmp_path / "pods.csv"
    f.write_text(
        "create_time,delete_time,cpu,memory,gpu\n"
        "2024-11-15 00:00:00,2024-11-15 00:02:00,500m,1Gi,\n"
        "2024-11-15 00:01:00,,2,8Gi,1\n"  # still running when exported
    )
    t = load_pod_events(f, end=dt.datetime(2024, 11, 15, 23, 59))
    small, gpu = sorted(t.services, key=lambda s: s.requests.gpu)
    assert small.name == "0.5c1g" and gpu.name == "2c8g1gpu"
    assert small.demand[:3].tolist() == pytest.approx([1, 1, 0])
    assert gpu.demand[[0, 1, 1000, 1439]].tolist() == pytest.approx([0, 1, 1, 1])
    f.write_text("create_time,delete_time,cpu,memory\n2024-11-15 00:05,2024-11-15 00:01,1,1Gi\n")
    with pytest.raises(ConfigError, match=r"line 2: deleted .* before it was created"):
        load_pod_events(f)
    f.write_text("create_time,cpu,memory\n2024-11-15 00:05,two,1Gi\n")
    with pytest.raises(ConfigError, match="line 2: not a Kubernetes quantity: 'two'"):
        load_pod_events(f)


def test_replica_series_wide_long_and_gaps(tmp_path: Path) -> None:
    wide = tmp_path / "wide.csv"
    lines = ["time,web,api"]
    for m in range(0, 1440):
        if 600 <= m < 700:
            continue  # a 100-minute hole in the scrape
        lines.append(f"2024-11-15 {m // 60:02d}:{m % 60:02d}:00,{10 + (m >= 700)},{3}")
    wide.write_text("\n".join(lines) + "\n")
    t = load_replica_series(wide)
    web = {s.name: s for s in t.services}["web"].demand
    assert web[599] == 10 and web[650] == 10 and web[700] == 11  # carried forward
    assert any("no sample for 101 minutes" in w for w in t.warnings)
    long = tmp_path / "long.csv"
    long.write_text("time,service,value\n2024-11-15 00:00,web,4\n2024-11-15 12:00,web,6\n")
    t = load_replica_series(long)
    assert t.services[0].demand[[0, 719, 720, 1439]].tolist() == [4, 4, 6, 6]
    assert any("carried to midnight" in w for w in t.warnings)


def test_prometheus_range_query_json(tmp_path: Path) -> None:
    start = dt.datetime(2024, 11, 15, tzinfo=dt.UTC).timestamp()
    doc = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {
                    "metric": {"deployment": "web", "namespace": "shop"},
                    "values": [[start + 60 * m, str(5 + m % 3)] for m in range(1440)],
                },
                {
                    "metric": {"deployment": "api", "namespace": "shop"},
                    "values": [[start + 60 * m, "2"] for m in range(1440)],
                },
            ],
        },
    }
    f = tmp_path / "q.json"
    f.write_text(json.dumps(doc))
    t = load_replica_series(f)
    by = {s.name: s.demand for s in t.services}
    assert set(by) == {"web", "api"} and by["web"][:4].tolist() == [5, 6, 7, 5]
    assert not t.warnings
    assert {s.name for s in load_replica_series(f, label="namespace").services} == {"shop"}
    f.write_text(json.dumps({"data": {"resultType": "vector", "result": []}}))
    with pytest.raises(ConfigError, match="not a Prometheus range-query answer"):
        load_replica_series(f)
