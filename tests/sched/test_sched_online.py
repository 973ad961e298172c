"""Tidal's online refit: decisions at minute t rest on minutes before t and t's observation only.

The simulator models the controller, which refits on the history it records: every midnight
the reserve and floor are refitted on the days seen so far, and a shortfall raises the reserve
the minute after. These tests check that nothing of the future leaks into a decision.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.policy import (
    TidalPolicy,
    ceil_replicas,
    fit_reserve,
    react_to_misses,
    refit_windows,
)
from tidal.sched.simulator import SimConfig, simulate
from tidal.sched.traces import DemandTrace, ServiceDemand, synthetic

DAY = MINUTES_PER_DAY


def bursty(days: int, seed: int) -> np.ndarray:
    """A daily tide with noise and a few bursts out of the blue: misses happen."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * DAY)
    d = 10 + 8 * np.sin(2 * np.pi * t / DAY) ** 2 + rng.normal(0, 1.0, t.size)
    for start in rng.integers(0, t.size - 30, size=3 * days):
        d[start : start + rng.integers(1, 20)] += rng.uniform(3, 25)
    out: np.ndarray = np.clip(d, 0, None)
    return out


def test_refit_windows_end_before_the_day_they_serve() -> None:
    assert refit_windows(3 * DAY, 2 * DAY, None) == [(0, 3 * DAY), (0, 4 * DAY)]
    assert refit_windows(3 * DAY, 3 * DAY, 2) == [
        (1 * DAY, 3 * DAY),
        (2 * DAY, 4 * DAY),
        (3 * DAY, 5 * DAY),
    ]


def test_a_shortfall_raises_the_reserve_the_minute_after_until_midnight() -> None:
    base = np.full(2 * DAY, 10.0)
    need = np.full(2 * DAY, 10, dtype=np.int64)
    need[100] = 17  # 7 more than the base decided a minute earlier
    need[DAY + 50] = 13
    r = react_to_misses(base, need, 1, np.array([2, 4]))
    assert r[:101].tolist() == [2] * 101  # minute 100 is not known before minute 101
    assert r[101:DAY].tolist() == [7] * (DAY - 101)
    assert r[DAY : DAY + 51].tolist() == [4] * 51  # the refit's own reserve after midnight
    assert r[DAY + 51 :].tolist() == [4] * (DAY - 51)  # a miss of 3 is below it
    with_lead = react_to_misses(base, need, 3, np.array([0, 0]))
    assert with_lead[100] == 0 and with_lead[101] == 7


def test_the_gumbel_level_is_turned_into_the_fewest_whole_replicas_that_cover_it() -> None:
    """The level is of fractional misses ``need - base`` and the reserve sits on
    ``ceil(base)``: ``floor(level)`` replicas cover every miss up to the level."""
    rng = np.random.default_rng(3)
    base = rng.uniform(5, 15, 10 * DAY)
    demand = np.roll(base, -1) + rng.gumbel(0.5, 0.4, base.size)
    r, top, level, days = fit_reserve(base, demand, 1, 5.0)
    assert level is not None and days == 10
    assert r == max(top, int(np.floor(level)))
    need = ceil_replicas(demand)
    covered = need[1:] <= ceil_replicas(base[:-1]) + r
    assert covered[(need[1:] - base[:-1]) <= level].all()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 4 * DAY - 2),
    st.integers(0, 1000),
    st.sampled_from([1, 5]),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([None, 3]),
)
def test_online_plan_never_uses_future_minutes(
    t: int, seed: int, smoothing: int, lead: int, window: int | None
) -> None:
    """Change every minute after ``t`` of the evaluated days: the targets up to ``t`` (decided
    on the load observed as minute ``t`` starts) stay what they were."""
    history = bursty(4, seed)
    demand = bursty(4, seed + 1)
    policy = TidalPolicy(lead_minutes=lead, smoothing_minutes=smoothing)
    plan = policy.online(history, demand, window_days=window)
    changed = demand.copy()
    changed[t + 1 :] = np.random.default_rng(seed).uniform(0, 200, changed.size - t - 1)
    again = policy.online(history, changed, window_days=window)
    assert (plan.targets[: t + 1] == again.targets[: t + 1]).all()
    assert (plan.reserves[: t + 1] == again.reserves[: t + 1]).all()


def test_online_plan_learns_from_the_days_it_has_served() -> None:
    """A service that gets burstier after the training week: the fit on the training days
    alone misses the bursts every day; refitted every midnight and raised after a shortfall,
    the reserve grows and the misses stop repeating."""
    rng = np.random.default_rng(5)
    history = 20 + rng.normal(0, 0.3, 7 * DAY)
    demand = 20 + rng.normal(0, 0.3, 5 * DAY)
    for d in range(5):
        demand[d * DAY + 600 : d * DAY + 603] += 15  # a burst at 10:00 every day
        demand[d * DAY + 1200 : d * DAY + 1202] += 14
    policy = TidalPolicy()
    fixed = policy.fit(history)
    need = ceil_replicas(demand)
    stale = fixed.targets(demand, float(history[-1]))
    online = policy.online(history, demand).targets
    missed = lambda targets: int((need[1:] > targets[:-1]).sum())  # noqa: E731
    assert missed(stale) >= 10  # every burst, every day
    assert missed(online) < missed(stale) // 3
    assert online.max() > stale.max()


def test_simulator_online_refit_is_causal_for_every_fitted_policy() -> None:
    """The simulator's reactive-reserve and Tidal see the same past: perturbing the last
    evaluated day changes no decision before it (same costs up to there, measured by
    evaluating one day fewer)."""
    trace = synthetic(seed=3, days=10, services=2)
    cut = DemandTrace(
        trace.name,
        trace.start,
        tuple(ServiceDemand(s.name, s.demand[: 9 * DAY], s.requests) for s in trace.services),
    )
    noisy = DemandTrace(
        trace.name,
        trace.start,
        tuple(
            ServiceDemand(
                s.name,
                np.concatenate([s.demand[: 9 * DAY], s.demand[9 * DAY :] * 3 + 40]),
                s.requests,
            )
            for s in trace.services
        ),
    )
    cfg = SimConfig()
    a = simulate(cut, cfg, ("reactive-reserve", "tidal"))
    b = simulate(noisy, cfg, ("reactive-reserve", "tidal"))
    day = slice(0, 2 * DAY)
    for name in ("reactive-reserve", "tidal"):
        assert (a.series[name].ready_capacity[day] == b.series[name].ready_capacity[day]).all()
        assert (a.series[name].virtual_live[day] == b.series[name].virtual_live[day]).all()


@pytest.mark.parametrize("refit", [True, False])
def test_training_only_fit_is_still_there(refit: bool) -> None:
    trace = synthetic(seed=11, days=9, services=2)
    r = simulate(trace, SimConfig(refit_daily=refit), ("reactive-reserve", "tidal")).policies
    assert r["tidal"].slo_violation_minutes == 0
