"""Invariants of the command center's merge and of the policies, for any inputs (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.cgroups import CpuLimits
from tidal.qos.collector import ContainerMetrics, NodeMetrics
from tidal.qos.command_center import merge_advice
from tidal.qos.policies import SloFeedback, UtilisationBudget
from tidal.qos.snapshot import Advice, ContainerView, Slo, Snapshot

cores = st.floats(min_value=0.01, max_value=4.0, allow_nan=False)
limits = st.builds(
    lambda q, s: CpuLimits.from_cores(q, shares=s),
    st.one_of(st.none(), cores),
    st.integers(min_value=2, max_value=4096),
)


def _snap(
    on_use: float,
    off_use: float,
    on: CpuLimits,
    off: CpuLimits,
    mem_use: int,
    latency: float | None,
) -> Snapshot:
    node = NodeMetrics(
        0.0, 2.0, min(2.0, on_use + off_use), 8 << 30, 4 << 30, 0.0, None, True, True
    )

    def view(cg: str, prio: str, use: float, lim: CpuLimits) -> ContainerView:
        m = ContainerMetrics(cg, 0.0, use, 0.0, mem_use, mem_use, 1 << 30, lim, None)
        return ContainerView(
            cg, {}, prio, cg, m, CpuLimits.from_cores(1.0 if prio == "online" else 2.0)
        )  # type: ignore[arg-type]

    return Snapshot(
        0.0,
        node,
        (view("on", "online", on_use, on), view("off", "offline", off_use, off)),
        Slo("on", 250.0),
        {"on": latency} if latency is not None else {},
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["on", "off"]), limits, st.one_of(st.none(), st.integers(0, 2 << 30))
        ),
        max_size=6,
    ),
    st.integers(min_value=0, max_value=1 << 30),
)
def test_merge_never_below_use_and_offline_is_strictest(
    wishes: list[tuple[str, CpuLimits, int | None]], mem_use: int
) -> None:
    s = _snap(0.5, 1.0, CpuLimits(), CpuLimits(), mem_use, None)
    advice = [Advice(cg, "r", "", cpu=lim, memory_limit_bytes=mem) for cg, lim, mem in wishes]
    for t in merge_advice(s, advice):
        if t.after.memory_limit_bytes is not None:
            assert t.after.memory_limit_bytes >= mem_use
        mine = [a.cpu for a in advice if a.cgroup == t.cgroup and a.cpu is not None]
        if t.cgroup == "off" and mine:
            q = t.after.cpu.quota_cores
            assert all(
                q is not None and (m.quota_cores is None or q <= m.quota_cores + 1e-9) for m in mine
            ) or all(m.quota_cores is None for m in mine)
            assert t.after.cpu.shares == min(m.shares for m in mine)


@settings(max_examples=200, deadline=None)
@given(cores, cores, limits, limits, st.one_of(st.none(), st.floats(0, 5000)))
def test_policies_respect_floors_and_specs(
    on_use: float, off_use: float, on: CpuLimits, off: CpuLimits, latency: float | None
) -> None:
    s = _snap(on_use, off_use, on, off, 0, latency)
    for policy in (SloFeedback(floor_cores=0.2), UtilisationBudget(floor_cores=0.1)):
        for a in policy.evaluate(s):
            assert a.cpu is not None
            q = a.cpu.quota_cores
            if a.cgroup == "off":
                # Never below the policy's floor unless it was already lower (then kept).
                assert q is None or q >= min(0.1, off.quota_cores or 9.0) - 1e-6
                # never above the offline spec (2 cores) unless it was already there
                assert q is None or q <= max(2.0, off.quota_cores or 0.0) + 1e-9
            else:
                assert q is None or q <= 1.5 + 1e-9  # online at most ceiling_factor x spec
