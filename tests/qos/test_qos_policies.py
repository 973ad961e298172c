from __future__ import annotations

from dataclasses import replace

import pytest

from tidal.cgroups import CpuLimits
from tidal.qos.collector import ContainerMetrics, NodeMetrics
from tidal.qos.command_center import merge_advice
from tidal.qos.policies import CpuSpike, MemoryGuard, SloFeedback, UtilisationBudget
from tidal.qos.snapshot import Advice, ContainerView, Slo, Snapshot


def node(busy: float = 1.5, available: int = 4 << 30) -> NodeMetrics:
    return NodeMetrics(1.0, 2.0, busy, 8 << 30, available, 0.0, None, True, True)


def view(
    cg: str,
    priority: str,
    cores: float,
    current: CpuLimits,
    baseline: CpuLimits | None = None,
    mem: tuple[int, int | None] = (0, None),
) -> ContainerView:
    m = ContainerMetrics(cg, 1.0, cores, 0.0, mem[0], mem[0], mem[1], current, None)
    return ContainerView(cg, {}, priority, cg, m, baseline or current)  # type: ignore[arg-type]


STATIC_ON = CpuLimits.from_cores(1.0)
STATIC_OFF = CpuLimits.from_cores(2.0)


def snap(
    latency: float | None,
    online_cores: float = 0.8,
    off: CpuLimits = STATIC_OFF,
    on: CpuLimits = STATIC_ON,
) -> Snapshot:
    return Snapshot(
        1.0,
        node(),
        (
            view("web", "online", online_cores, on, STATIC_ON),
            view("etl", "offline", 1.0, off, STATIC_OFF),
        ),
        Slo("web", 250.0),
        {"web": latency} if latency is not None else {},
    )


def cpu_of(advice: list[Advice], cg: str) -> CpuLimits:
    (a,) = [a for a in advice if a.cgroup == cg]
    assert a.cpu is not None
    return a.cpu


def test_budget_formula() -> None:
    p = UtilisationBudget(threshold=0.65, floor_cores=0.1)
    # capacity 2 x 0.65 - online 0.8 - system (1.5 - 0.8 - 1.0 < 0 -> 0) = 0.5
    assert cpu_of(p.evaluate(snap(None)), "etl").quota_cores == pytest.approx(0.5)
    busy = replace(snap(None), node=node(busy=2.0))  # system = 2.0 - 1.8 = 0.2
    assert cpu_of(p.evaluate(busy), "etl").quota_cores == pytest.approx(0.3)
    heavy = snap(None, online_cores=1.9)
    assert cpu_of(p.evaluate(heavy), "etl").quota_cores == pytest.approx(0.1)  # the floor


def test_slo_feedback_suppresses_weight_first_then_quota() -> None:
    p = SloFeedback()
    calm = cpu_of(p.evaluate(snap(50.0)), "etl")
    assert calm.shares == 2 and calm.quota_cores == pytest.approx(2.0)  # weight only
    near = cpu_of(p.evaluate(snap(200.0)), "etl")  # 0.8 of the SLO > tighten_at 0.7
    assert near.quota_cores == pytest.approx(1.75)
    over = cpu_of(p.evaluate(snap(400.0)), "etl")  # above the SLO: straight to the floor
    assert over.quota_cores == pytest.approx(p.floor_cores)


def test_slo_feedback_loosens_back_to_spec_and_restores_weight_when_online_idles() -> None:
    p = SloFeedback(step_cores=0.5)
    tight = CpuLimits.from_cores(1.2, shares=2)
    step = cpu_of(p.evaluate(snap(20.0, off=tight)), "etl")
    assert step.quota_cores == pytest.approx(1.7) and step.shares == 2
    almost = CpuLimits.from_cores(1.8, shares=2)
    assert cpu_of(p.evaluate(snap(20.0, off=almost)), "etl").quota_us == STATIC_OFF.quota_us
    idle = cpu_of(
        p.evaluate(snap(None, online_cores=0.0, off=CpuLimits.from_cores(2.0, shares=2))), "etl"
    )
    assert idle.shares == STATIC_OFF.shares


def test_slo_feedback_holds_in_the_dead_band() -> None:
    p = SloFeedback()
    tight = CpuLimits.from_cores(1.0, shares=2)
    assert p.evaluate(snap(150.0, off=tight)) == []  # 0.6 of SLO: between 0.4 and 0.7


def test_slo_feedback_raises_online_only_when_offline_is_at_floor() -> None:
    p = SloFeedback(floor_cores=0.25)
    floor = CpuLimits.from_cores(0.25, shares=2)
    advice = p.evaluate(snap(400.0, off=floor))
    on = cpu_of(advice, "web")
    assert on.quota_cores == pytest.approx(1.25) and on.burst_us == on.quota_us
    advice = p.evaluate(snap(400.0, off=CpuLimits.from_cores(1.0, shares=2)))
    assert all(a.cgroup != "web" for a in advice)
    # Well inside the SLO again: the online group goes back to its spec first.
    back = cpu_of(p.evaluate(snap(10.0, on=CpuLimits.from_cores(1.5), off=floor)), "web")
    assert back == STATIC_ON


def test_slo_feedback_cpu_ceiling_signal_without_latency() -> None:
    p = SloFeedback()
    s = replace(snap(None, online_cores=0.95), slo=Slo(None, None, 0.8))
    assert cpu_of(p.evaluate(s), "etl").quota_cores == pytest.approx(p.floor_cores)  # 0.95 > 0.8


def test_cpu_spike_raises_online_quota_up_to_ceiling() -> None:
    r = CpuSpike(threshold=0.9, step_cores=0.25, ceiling_factor=1.5)
    assert cpu_of(r.evaluate(snap(None, online_cores=0.95)), "web").quota_cores == pytest.approx(
        1.25
    )
    at_ceiling = snap(None, online_cores=1.5, on=CpuLimits.from_cores(1.5))
    assert r.evaluate(at_ceiling) == []
    assert r.evaluate(snap(None, online_cores=0.3)) == []


def test_memory_guard_and_merge_never_shrink_below_use() -> None:
    g = MemoryGuard()
    s = Snapshot(
        1.0,
        node(available=100 << 20),  # ~1 % available: tight
        (
            view("web", "online", 0.5, STATIC_ON, mem=(950 << 20, 1000 << 20)),
            view("etl", "offline", 1.0, STATIC_OFF, mem=(500 << 20, None)),
        ),
        Slo(),
    )
    advice = g.evaluate(s)
    by = {a.cgroup: a.memory_limit_bytes for a in advice}
    assert by["web"] == 1250 << 20
    assert by["etl"] == int((500 << 20) * 1.1)
    # A rule that asks for less than use is clamped by the merge.
    shrink = [Advice("etl", "x", "too small", memory_limit_bytes=100 << 20)]
    (t,) = merge_advice(s, shrink)
    assert t.after.memory_limit_bytes == 500 << 20


def test_merge_offline_strictest_online_most_generous() -> None:
    s = snap(None)
    advice = [
        Advice("etl", "a", "", cpu=CpuLimits.from_cores(1.5)),
        Advice("etl", "b", "", cpu=CpuLimits.from_cores(0.5, shares=2)),
        Advice("web", "a", "", cpu=CpuLimits.from_cores(1.2)),
        Advice("web", "b", "", cpu=CpuLimits.from_cores(1.4)),
        Advice("unknown", "a", "", cpu=CpuLimits()),
    ]
    targets = {t.cgroup: t for t in merge_advice(s, advice)}
    assert set(targets) == {"etl", "web"}
    assert targets["etl"].after.cpu.quota_cores == pytest.approx(0.5)
    assert targets["etl"].after.cpu.shares == 2
    assert targets["web"].after.cpu.quota_cores == pytest.approx(1.4)
    assert targets["etl"].rules == ("a", "b")
