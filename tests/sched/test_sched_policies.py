"""Policies against the baselines a user would otherwise run, on days and seeds never tuned on.

Tidal's one chosen constant (the reserve's return period, 70 days) was picked on synthetic
seeds 1-5; these tests use seeds 11 and 12 and the step scenario's seeds 21-23.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tidal.cli.main import app
from tidal.errors import ConfigError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.model import Resources
from tidal.sched.packing import ffd_nodes, fits
from tidal.sched.simulator import SimConfig, run_virtual, simulate
from tidal.sched.traces import (
    DemandTrace,
    ServiceDemand,
    pod_event_sample,
    step_scenario,
    synthetic,
    write_pod_events,
)

SHAPES = [
    Resources(500, 1024),
    Resources(2000, 4096),
    Resources(4000, 16384),
    Resources(8000, 8192),
    Resources(4000, 16384, 1),
]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SHAPES), st.integers(0, 40)), max_size=5))
def test_ffd_on_counts_equals_first_fit_decreasing_pod_by_pod(
    items: list[tuple[Resources, int]],
) -> None:
    node = Resources(24_000, 49_152, 4)
    merged: dict[Resources, int] = {}
    for r, c in items:
        merged[r] = merged.get(r, 0) + c
    got = ffd_nodes(list(merged.items()), node)
    # the model: every pod, largest first, to the first node that has room
    pods = sorted(
        (r for r, c in merged.items() for _ in range(c)),
        key=lambda r: -max(r.cpu_milli / node.cpu_milli, r.memory_mib / node.memory_mib, r.gpu / 4),
    )
    free: list[Resources] = []
    for p in pods:
        for i, f in enumerate(free):
            if p.fits_in(f):
                free[i] = f - p
                break
        else:
            free.append(node - p)
    assert got == len(free)
    # never below the fluid bound of any resource
    total = sum((r.cpu_milli * c for r, c in merged.items()), 0)
    assert got >= -(-total // node.cpu_milli)
    assert all(fits(node, r) >= 1 for r in merged)


def test_creation_latency_zero_means_at_once() -> None:
    live, ready = run_virtual(np.array([0, 3, 5, 1]), lead=0, stabilisation=0)
    assert live.tolist() == ready.tolist() == [0, 3, 5, 1]
    assert SimConfig(creation_latency_s=0).lead_minutes == 0
    assert SimConfig(creation_latency_s=61).lead_minutes == 2


@pytest.mark.parametrize(
    "seed",
    [
        11,
        pytest.param(
            12,
            marks=pytest.mark.xfail(
                strict=True,
                reason="1 SLO minute on seed 12 since the reserve is floor(level) at a 70-day "
                "return period (chosen on seeds 1-5); it had none with ceil(level) at 5 days",
            ),
        ),
    ],
)
def test_tidal_beats_reactive_reserve_on_unseen_seeds(seed: int) -> None:
    r = simulate(synthetic(seed=seed, days=14, services=6), SimConfig(train_days=7)).policies
    t, rr = r["tidal"], r["reactive-reserve"]
    assert t.slo_violation_minutes == 0
    assert t.cost <= rr.cost
    assert r["oracle"].cost <= t.cost < r["all-owned"].cost


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_step_scenario_the_floor_schedules_the_step(seed: int) -> None:
    """A daily step is scheduled by the cron floor: Tidal stays at the oracle, while the
    fixed reserve (which must cover the step at every minute) costs more than all-owned."""
    r = simulate(step_scenario(seed=seed, days=10, services=3)).policies
    t, rr, o = r["tidal"], r["reactive-reserve"], r["oracle"]
    assert t.slo_violation_minutes == 0 and t.cost <= rr.cost
    assert rr.cost > r["all-owned"].cost
    assert t.cost <= o.cost * 1.002


def test_writeup_scenario_reaches_the_writeups_saving() -> None:
    """Off-peak 70 % of a 120-replica peak for 20 h, the peak for 4 h, virtual at 1.5x: the
    write-up's 22.5 %, less the one minute a day each pod is paid before it serves."""
    trace = step_scenario(seed=1, days=10, services=1, peak_replicas=(120.0, 120.0))
    slow = simulate(trace).policies
    assert slow["tidal"].slo_violation_minutes == 0
    assert slow["tidal"].saving_vs_all_owned >= 0.2243
    assert slow["oracle"].saving_vs_all_owned == pytest.approx(0.2247, abs=1e-4)
    instant = simulate(trace, SimConfig(creation_latency_s=0)).policies
    assert instant["tidal"].saving_vs_all_owned == pytest.approx(0.225, abs=1e-6)


def test_slo_is_counted_on_raw_demand_whatever_the_decisions_see() -> None:
    """A one-minute spike every hour: a policy deciding on a 5-minute mean is not excused."""
    minutes = 9 * MINUTES_PER_DAY
    d = np.full(minutes, 10.0)
    d[::60] = 30.0
    trace = DemandTrace("spiky", synthetic(days=1, services=1).start, (ServiceDemand("s", d),))
    raw = simulate(trace, SimConfig(), ("naive-overflow",)).policies["naive-overflow"]
    smooth = simulate(trace, SimConfig(smoothing_minutes=5), ("naive-overflow",)).policies
    assert raw.slo_violation_minutes > 0
    assert smooth["naive-overflow"].slo_violation_minutes >= raw.slo_violation_minutes


def test_mixed_sizes_and_gpus_are_packed_and_priced(tmp_path: Path) -> None:
    trace_file = write_pod_events(pod_event_sample(seed=2, days=9), tmp_path / "pods.csv")
    res = CliRunner().invoke(app, ["sched", "simulate", "--trace", str(trace_file), "--json"])
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(res.stdout)
    p = doc["policies"]
    assert p["tidal"]["slo_violation_minutes"] == 0
    assert p["tidal"]["cost"] <= p["reactive-reserve"]["cost"]
    for r in p.values():  # GPU and CPU nodes, never above the ceiling
        assert r["owned_utilisation_peak"] <= 0.6 + 1e-9
    assert p["all-owned"]["owned_nodes"] >= 2  # at least one CPU and one GPU node


def test_cli_train_and_eval_files_and_warnings(tmp_path: Path) -> None:
    train = write_pod_events(pod_event_sample(seed=4, days=3), tmp_path / "train.csv")
    rows = pod_event_sample(seed=5, days=2)
    cut = [r for r in rows if r["create_time"] < "2024-11-05 12:00"]  # stops at noon
    evaluated = write_pod_events(cut, tmp_path / "eval.csv")
    res = CliRunner().invoke(
        app,
        ["sched", "simulate", "--train", str(train), "--eval", str(evaluated), "--policy", "tidal"],
    )
    assert res.exit_code == 0, res.output
    assert "padded with zero demand" in res.output  # the evaluated file ends early
    assert "fitted on 3 other days" in res.output
    res = CliRunner().invoke(app, ["sched", "simulate", "--train", str(train)])
    assert isinstance(res.exception, ConfigError)
    assert "--train and --eval go together" in str(res.exception)


def test_cluster_autoscaler_waits_for_nodes_to_start() -> None:
    """Pending pods start whole nodes that serve after 3 minutes: even with instant virtual
    pods for everyone else, the autoscaler misses the first minutes of every step."""
    trace = step_scenario(seed=1, days=9, services=1, peak_replicas=(120.0, 120.0))
    r = simulate(trace, SimConfig(creation_latency_s=0)).policies
    ca = r["cluster-autoscaler"]
    assert ca.autoscaled_node_hours > 0 and ca.virtual_pod_hours == 0
    assert ca.slo_violation_minutes == 2 * 3  # two evaluated days, three minutes of start-up
    assert r["reactive-reserve"].slo_violation_minutes == 0


def test_short_traces_are_named_in_warnings() -> None:
    trace = step_scenario(seed=1, days=2, services=1)
    report = simulate(trace, SimConfig(train_days=1), ("tidal",))
    assert any("only 1 evaluated day" in w for w in report.warnings)
    assert any("only 1 training day" in w for w in report.warnings)
