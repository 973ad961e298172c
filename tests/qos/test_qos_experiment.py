"""A short smoke run of the co-location experiment on real cgroups (about 45 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidal.qos.experiment.runner import ExperimentConfig, run_experiment, summarise, verdict


def test_summarise_windows_and_percentiles() -> None:
    # 10 requests/s for 30 s; the middle window is slow.
    reqs = [(i / 10, 0.9 if 10 <= i / 10 < 20 else 0.01) for i in range(300)]
    r = summarise(reqs, 0.0, 30.0, 250.0, 10.0)
    assert r["requests"] == 300
    assert r["window_p95_ms"] == [10.0, 900.0, 10.0]
    assert r["slo_window_attainment"] == pytest.approx(2 / 3, abs=1e-3)
    assert r["p50_ms"] == 10.0 and r["p99_ms"] == 900.0


def test_verdict() -> None:
    runs = {
        "static": {"offline_work": 100},
        "agent": {"offline_work": 70, "slo_window_attainment": 1.0},
    }
    assert verdict({"runs": runs})["met"] is True
    runs["agent"]["offline_work"] = 50
    assert verdict({"runs": runs})["met"] is False


@pytest.mark.cgroups
@pytest.mark.slow
def test_experiment_smoke_run() -> None:
    cfg = ExperimentConfig(duration_s=10.0, warmup_s=2.0)
    result = run_experiment(cfg)
    assert set(result) == {"slo_ms", "runs"} and result["slo_ms"] == 250
    assert set(result["runs"]) == {"alone", "static", "agent"}
    for name, r in result["runs"].items():
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], name
        assert 0.0 <= r["slo_window_attainment"] <= 1.0
        assert r["requests"] >= 0.9 * cfg.rate_rps * cfg.duration_s
    assert result["runs"]["alone"]["offline_work"] == 0
    assert result["runs"]["static"]["offline_work"] > 0
    assert result["runs"]["agent"]["offline_work"] > 0
    assert result["runs"]["agent"]["agent"]["adjustments"]["applied"] >= 1
    root = Path("/sys/fs/cgroup")
    leftovers = [p.name for p in [*root.glob("tidal-qos-exp-*"), *root.glob("*/tidal-qos-exp-*")]]
    assert leftovers == []
