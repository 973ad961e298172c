from __future__ import annotations

import math

import numpy as np
import pytest

from tidal.qos.aggregator import (
    DAY_S,
    Aggregator,
    Ewma,
    SeasonalTrendModel,
    SlidingWindow,
    percentile,
)


def test_percentiles_nearest_rank() -> None:
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    with pytest.raises(ValueError):
        percentile([], 50)


def test_window_expires_old_values() -> None:
    w = SlidingWindow(60)
    w.add(0, 100.0)
    for t in range(30, 40):
        w.add(t, 1.0)
    s = w.stats(59)
    assert s is not None and s.max == 100.0 and s.count == 11
    s = w.stats(61)
    assert s is not None and s.max == 1.0 and s.count == 10
    assert w.stats(200) is None


def test_ewma_half_life() -> None:
    e = Ewma(half_life_s=10)
    e.add(0, 0.0)
    assert e.add(10, 1.0) == pytest.approx(0.5)
    assert e.add(20, 1.0) == pytest.approx(0.75)


def _tidal_series(days: float, step_s: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Online CPU with a 4-hour daily peak, a slow upward trend and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, days * DAY_S, step_s)
    hour = (t % DAY_S) / 3600
    peak = np.exp(-(((hour - 20) / 2.0) ** 2))  # evening peak
    y = 0.3 + 1.2 * peak + 0.05 * t / DAY_S + rng.normal(0, 0.05, len(t))
    return t, y


def test_seasonal_trend_model_predicts_next_day_of_a_tidal_series() -> None:
    t, y = _tidal_series(7, 300)
    model = SeasonalTrendModel()
    model.fit(t, y)
    t_next, y_next = _tidal_series(8, 300, seed=2)
    mask = t_next >= 7 * DAY_S
    pred = model.predict(t_next[mask])
    err = np.abs(pred - y_next[mask]).mean()
    # A trend-only (flat) forecast misses the daily peak badly; the seasonal one does not.
    flat = np.polyval(np.polyfit(t, y, 1), t_next[mask])
    flat_err = np.abs(flat - y_next[mask]).mean()
    assert err < 0.08
    assert err < flat_err / 3
    # The peak is predicted at the right hour.
    peak_hour = (t_next[mask][np.argmax(pred)] % DAY_S) / 3600
    assert abs(peak_hour - 20) < 1


def test_seasonal_model_trend_only_with_less_than_a_day() -> None:
    t = np.arange(0, 3600 * 6, 300.0)
    m = SeasonalTrendModel()
    m.fit(t, 2 + 0.001 * t)
    assert not any(m.season)
    assert m.predict(10_000.0)[0] == pytest.approx(12.0)


def test_aggregator_profiles_containers_and_apps() -> None:
    agg = Aggregator(bucket_s=300)
    for i in range(120):
        agg.ingest(float(i), {"a/1": 0.5, "a/2": 1.0 + (i % 2)}, {"a/1": "web", "a/2": "web"})
    p = agg.profile("app:web", 119)
    assert p is not None
    w = p.windows["1m"]
    assert w is not None and w.max == pytest.approx(2.5) and w.count == 61
    assert w.mean == pytest.approx((30 * 1.5 + 31 * 2.5) / 61)
    assert agg.profile("a/1", 119).ewma == pytest.approx(0.5)  # type: ignore[union-attr]
    assert agg.profile("missing", 0) is None


def test_aggregator_prediction_from_bucketed_history() -> None:
    agg = Aggregator(bucket_s=600)
    t, y = _tidal_series(3, 60)
    for ti, yi in zip(t, y, strict=True):
        agg.add("app:web", float(ti), float(yi))
    at_peak = agg.predict("app:web", 3 * DAY_S + 20 * 3600)
    at_night = agg.predict("app:web", 3 * DAY_S + 8 * 3600)
    assert at_peak is not None and at_night is not None
    assert at_peak - at_night > 0.9
    assert math.isclose(at_night, 0.3 + 0.15, abs_tol=0.1)


def test_prediction_is_refitted_when_a_bucket_closes_not_on_every_read() -> None:
    agg = Aggregator(bucket_s=300)
    for i in range(10 * 300):  # ten buckets of a flat 1.0
        agg.add("c", float(i), 1.0)
    before = agg.predict("c", 4000.0)
    model = agg._series["c"].model
    assert before == pytest.approx(1.0)
    assert agg.predict("c", 4000.0) == before and agg._series["c"].model is model  # cached
    for i in range(10 * 300, 20 * 300):  # then ten buckets of 3.0: the trend must rise
        agg.add("c", float(i), 3.0)
    after = agg.predict("c", 4000.0)
    assert after is not None and after > before + 0.5
