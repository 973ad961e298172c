"""Threshold predictor, autoscaler rules and cost model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.errors import ConfigError
from tidal.sched.autoscale import (
    MINUTES_PER_DAY,
    CronRule,
    HpaRule,
    cron_rules_from_profile,
    replica_target,
)
from tidal.sched.cost import CostBreakdown, owned_cost, slo_violation_minutes
from tidal.sched.predictor import (
    ThresholdPredictor,
    extrapolate,
    fit_margin,
    gumbel_return_level,
    optimal_threshold,
    threshold_cost,
)


def square_days(days: int, base: float, peak: float, peak_hours: int = 4) -> np.ndarray:
    day = np.full(MINUTES_PER_DAY, base)
    day[18 * 60 : (18 + peak_hours) * 60] = peak
    return np.tile(day, days)


def test_writeup_example_70_percent_owned_saves_22_5_percent() -> None:
    # 4 peak hours at 100, otherwise ~10 % (owned servers at 60 % peak, 10 % off-peak)
    d = square_days(1, 100 / 6, 100)
    all_owned = threshold_cost(d, 100, 1.5)
    seventy = threshold_cost(d, 70, 1.5)
    assert all_owned == pytest.approx(2400)
    assert 1 - seventy / all_owned == pytest.approx(0.225)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 200), min_size=1, max_size=300), st.sampled_from([1.2, 1.5, 3.0]))
def test_optimal_threshold_is_the_brute_force_minimum(values: list[float], ratio: float) -> None:
    d = np.array(values)
    best = min(threshold_cost(d, t, ratio) for t in range(int(np.ceil(d.max())) + 2))
    assert threshold_cost(d, optimal_threshold(d, ratio), ratio) == pytest.approx(best)


def ramp_days(days: int, base: float, peak: float, ramp_min: int = 60) -> np.ndarray:
    """Like square_days but with linear one-hour ramps: rises a relative headroom can cover."""
    day = np.full(MINUTES_PER_DAY, base)
    up = np.linspace(base, peak, ramp_min)
    day[17 * 60 : 17 * 60 + ramp_min] = up
    day[18 * 60 : 22 * 60] = peak
    day[22 * 60 : 22 * 60 + ramp_min] = up[::-1]
    return np.tile(day, days)


def test_fit_threshold_manual_override_and_capacity_cap() -> None:
    h = ramp_days(3, 20, 100)
    fc = ThresholdPredictor().fit(h)
    # a linear ramp extrapolated linearly: only its first minute surprises, by 80/60 replicas
    assert fc.ramp_headroom + fc.spare_replicas / 20 < 0.1
    # peak hours are < 1/1.5 of the day: owned sized near the (planned) base, far below peak
    assert fc.fitted_threshold == optimal_threshold(fc.plan(h).astype(float), 1.5)
    assert 20 <= fc.fitted_threshold <= 23
    assert fc.peak_replicas == pytest.approx(100)
    assert ThresholdPredictor(capacity_replicas=12).fit(h).threshold_replicas == 12
    manual = ThresholdPredictor(manual_threshold=70).fit(h)
    assert manual.threshold_replicas == 70 and manual.manual
    assert manual.fitted_threshold == fc.fitted_threshold
    # growth anticipates the ramp one minute ahead, flat elsewhere
    assert fc.growth[17 * 60 + 5] > 1.01 and fc.growth[12 * 60] == pytest.approx(1.0)
    assert min(fc.floor) == 20


def test_jumps_out_of_quiet_are_covered_by_spare_replicas() -> None:
    h = square_days(4, 0, 100)  # 0 -> 100 within a minute: no share of the load covers it
    fc = ThresholdPredictor().fit(h)
    assert fc.margin.heldout_days == 3 and fc.margin.load_fraction == 0
    assert fc.spare_replicas >= 100  # what the next minute may bring, whatever the load now
    planned = fc.plan(h[:-1], previous=0.0)
    assert np.all(planned >= np.ceil(h[1:]))  # one minute ahead, never short on its history


def test_noise_that_scales_with_load_gets_a_relative_margin() -> None:
    rng = np.random.default_rng(5)
    level = ramp_days(6, 20, 200)
    h = level * (1 + rng.normal(0, 0.01, level.size))  # 1 % per minute, 2 replicas at the peak
    fc = ThresholdPredictor().fit(h)
    assert fc.margin.load_fraction > 0.01
    assert fc.spare_replicas < 0.2 * fc.ramp_headroom * 200  # little of it is absolute
    assert 1.0 <= fc.margin.safety < 2.0


def test_margin_is_learned_on_days_the_forecast_had_not_seen() -> None:
    flat = np.full(MINUTES_PER_DAY, 20.0)
    ramp = ramp_days(1, 20, 100)
    h = np.concatenate([flat, ramp])
    pred = ThresholdPredictor()
    ((f, r, scale),) = pred.heldout_misses(h, days=2)
    # day two forecast from day one only: no growth expected, the load and its last rise
    assert np.allclose(f, extrapolate(ramp, 20.0, 1.0)[:-1])
    assert np.allclose(r, ramp[1:] - f) and np.all(scale == 20.0)
    # seen in-sample, the ramp would have been expected (growth > 1) and its misses hidden
    assert pred.fit(ramp_days(2, 20, 100)).growth[17 * 60 + 5] > 1.01
    burst = ramp.copy()
    burst[10 * 60 : 10 * 60 + 30] += 40  # 20 -> 60 in one minute at 10:00
    fc = pred.fit(np.concatenate([ramp, burst, ramp]))
    assert fc.margin.heldout_days == 2
    assert fc.spare_replicas >= 40  # the burst, and a safety for larger ones
    assert pred.fit(ramp_days(3, 20, 100)).spare_replicas < 2


def test_safety_covers_misses_larger_than_any_held_out_day() -> None:
    rng = np.random.default_rng(3)
    days = []
    for _ in range(8):
        d = np.zeros(MINUTES_PER_DAY)
        at = int(rng.integers(60, MINUTES_PER_DAY - 60))
        d[at : at + 20] = rng.uniform(5, 15)  # one burst out of silence, random size
        days.append(d)
    h = np.concatenate(days)
    fc = ThresholdPredictor().fit(h)
    seen = max(d.max() for d in days[1:])
    assert fc.margin.safety > 1.0
    assert fc.spare_replicas > seen  # beyond the largest burst the held-out days showed
    rare = ThresholdPredictor(return_period_days=10_000).fit(h)
    assert rare.spare_replicas > fc.spare_replicas  # rarer misses allowed: larger margin
    # days without a burst say how rare bursts are, not how large: they lower the margin
    idle = np.zeros(MINUTES_PER_DAY)
    sparse = np.concatenate([x for d in days[1:] for x in (d, idle)])
    assert ThresholdPredictor(window_days=14).fit(sparse).margin.safety < fc.margin.safety


def test_gumbel_return_level_recovers_a_known_law() -> None:
    sample = np.random.default_rng(1).gumbel(loc=2.0, scale=0.5, size=20_000)
    expected = 2.0 - 0.5 * np.log(-np.log(1 - 1 / 100))
    assert gumbel_return_level(sample, 100) == pytest.approx(expected, rel=0.02)
    with pytest.raises(ConfigError, match="return period"):
        ThresholdPredictor(return_period_days=1)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 100), st.floats(-20, 30)), min_size=1, max_size=60),
    st.floats(1, 200),
)
def test_fit_margin_covers_every_residual(pairs: list[tuple[float, float]], scale: float) -> None:
    f = np.array([x for x, _ in pairs])
    r = np.array([y for _, y in pairs])
    b, a = fit_margin(f, r, np.full(f.size, scale), 1.5)
    assert 0 <= b <= 1 and a >= 0
    assert np.all(b * f + a * max(scale, 1.0) >= r - 1e-9)


def test_fit_margin_prefers_the_shape_of_the_misses() -> None:
    f = np.linspace(1, 100, 200)
    b, a = fit_margin(f, 0.05 * f, np.full(200, 100.0), 1.5)
    assert b == pytest.approx(0.05) and a == pytest.approx(0.0)  # misses scale with load
    b, a = fit_margin(f, np.full(200, 8.0), np.full(200, 100.0), 1.5)
    assert b == 0 and a == pytest.approx(0.08)  # misses of a fixed size


def test_plan_is_the_forecast_plus_the_margin() -> None:
    fc = ThresholdPredictor().fit(ramp_days(2, 20, 100))
    loads = [0.0, 20.0, 55.5, 100.0]
    minutes = [3 * 60, 12 * 60, 17 * 60 + 20, 19 * 60]
    for load, minute in zip(loads, minutes, strict=True):
        f = load * fc.growth[minute]
        want = np.ceil(f * (1 + fc.ramp_headroom) + fc.spare_replicas - 1e-9)
        assert fc.plan(np.array([load]), start_minute=minute, previous=load)[0] == want
    other = replace(fc.margin, load_fraction=0.5, peak_fraction=0.0, safety=1.0)
    assert fc.plan(np.array([40.0]), 3 * 60, 40.0, margin=other)[0] == 60


def test_fit_sees_only_the_history_it_is_given() -> None:
    h = ramp_days(4, 20, 100)
    spiky = h.copy()
    spiky[-MINUTES_PER_DAY:] *= 3  # the last day is wild
    quiet = ThresholdPredictor().fit(h[: 3 * MINUTES_PER_DAY])
    assert ThresholdPredictor().fit(spiky[: 3 * MINUTES_PER_DAY]) == quiet
    report = ThresholdPredictor().backtest(spiky, min_train_days=3)
    assert report.days == 1
    # the day was never fitted on, so the forecast misses its peak by 2/3
    assert report.peak_bias == pytest.approx(-2 / 3)
    assert report.underforecast_minutes == pytest.approx(1.0)
    steady = ThresholdPredictor().backtest(h, min_train_days=2)
    assert steady.peak_mape == pytest.approx(0) and steady.threshold_regret == pytest.approx(0)


def test_predictor_rejects_short_history() -> None:
    with pytest.raises(ConfigError, match="at least one whole day"):
        ThresholdPredictor().fit(np.ones(100))
    with pytest.raises(ConfigError, match="backtest needs more than 2 days"):
        ThresholdPredictor().backtest(np.ones(2 * MINUTES_PER_DAY))


def test_hpa_and_cron_take_the_higher_target() -> None:
    hpa = HpaRule(target_utilisation=0.5, min_replicas=2, max_replicas=50)
    assert hpa.desired(10) == 20 and hpa.desired(0) == 2 and hpa.desired(100) == 50
    assert hpa.desired(10, growth=1.5) == 30
    evening = CronRule(18 * 60, 22 * 60, 40, weekdays=frozenset(range(5)))
    assert replica_target(10, 19 * 60, 2, hpa, [evening]) == 40
    assert replica_target(10, 19 * 60, 6, hpa, [evening]) == 20  # Sunday: rule inactive
    overnight = CronRule(23 * 60, 60, 7)
    assert overnight.active(10, 0) and not overnight.active(120, 0)
    with pytest.raises(ConfigError, match="target utilisation"):
        HpaRule(target_utilisation=0)


def test_cron_rules_cover_the_profile_with_lead() -> None:
    profile = square_days(1, 5, 50)
    rules = cron_rules_from_profile(list(profile), step_minutes=60, lead_minutes=1)
    by_hour = {r.start_minute // 60: r.replicas for r in rules}
    assert by_hour[17] == 50  # the last minute of 17:xx looks one minute ahead
    assert by_hour[16] == 5 and by_hour[21] == 50 and by_hour[22] == 5
    floor = cron_rules_from_profile(list(profile), step_minutes=60, lead_minutes=1, cover=False)
    by_hour = {r.start_minute // 60: r.replicas for r in floor}
    # a floor never asks more than the profile at any minute of its window
    assert by_hour[17] == 5 and by_hour[18] == 50 and by_hour[21] == 5


def test_cost_model() -> None:
    assert owned_cost(10, 120) == pytest.approx(20)
    a, b = CostBreakdown(10, 0), CostBreakdown(5, 2.75)
    assert b.saving_vs(a) == pytest.approx(0.225)
    demand = np.array([[1.0, 2.5, 3.0], [0.0, 1.0, 1.0]])
    cap = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 1.0]])
    zero = np.zeros_like(demand)
    # minute 1 (service 2 short) and minute 2 (service 1 short)
    assert slo_violation_minutes(demand, cap, zero, zero + 1) == 2
    # owned above its limit counts too
    assert slo_violation_minutes(demand, demand + 5, zero + 2, zero + 1) == 3


def test_plan_extrapolates_the_last_rise() -> None:
    fc = ThresholdPredictor(trend_gain=1.0).fit(ramp_days(2, 20, 100))
    quiet = 3 * 60  # growth is 1 here
    flat = fc.plan(np.array([50.0]), start_minute=quiet, previous=50.0)[0]
    rising = fc.plan(np.array([50.0]), start_minute=quiet, previous=40.0)[0]
    falling = fc.plan(np.array([50.0]), start_minute=quiet, previous=60.0)[0]
    factor = 1 + fc.ramp_headroom
    assert flat == falling == np.ceil(50 * factor + fc.spare_replicas - 1e-9)
    assert rising == np.ceil(60 * factor + fc.spare_replicas - 1e-9)
    off = ThresholdPredictor(trend_gain=0.0).fit(ramp_days(2, 20, 100))
    assert (
        off.plan(np.array([50.0]), quiet, previous=40.0)[0] == off.plan(np.array([50.0]), quiet)[0]
    )
