"""Threshold predictor: how many replicas of a service should live on owned nodes.

Owned capacity is paid every hour, virtual capacity only while used but at ``price_ratio``
times the price. For a fixed owned capacity T the cost over a period is
``T * hours + price_ratio * (replica-hours above T)``, which is lowest where demand exceeds T
for ``1 / price_ratio`` of the time. The predictor fits that threshold on past days, caps it
by what the owned nodes can carry within their ceiling, and lets an operator override it.

It also forecasts the next day minute by minute: the typical profile (mean of the recent days,
smoothed) gives the growth expected over the creation latency, so the HPA scales the load it
sees by that growth instead of carrying a fixed, expensive headroom; the floor profile (what
every recent day needed at that minute) becomes cron rules that pre-scale whatever the metrics
say; and the residual headroom is the largest rise the growth did not explain. It only ever sees
days before the one it predicts; :func:`backtest` walks forward the same way and reports error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError
from tidal.sched.autoscale import MINUTES_PER_DAY

FloatArray = NDArray[np.float64]

MAX_GROWTH = 2.0
"""The forecast may at most double the observed load within the lead time; a near-empty
typical minute followed by a busier one would otherwise ask for absurd replica counts."""
MAX_HEADROOM = 1.0


def optimal_threshold(demand: FloatArray, price_ratio: float) -> int:
    """The owned replica count that minimises owned + virtual cost over ``demand``."""
    if price_ratio <= 1:
        return int(np.ceil(demand.max() - 1e-9)) if demand.size else 0
    need = np.ceil(np.asarray(demand, dtype=np.float64) - 1e-9)
    if need.size == 0:
        return 0
    # cost(T+1) - cost(T) = (n - p * #(need > T)) / 60: raise T while at least n/p minutes
    # need more, i.e. T is the k-th largest need with k = ceil(n / p)
    k = min(need.size, max(1, math.ceil(need.size / price_ratio - 1e-9)))
    return int(np.partition(need, need.size - k)[need.size - k])


def threshold_cost(demand: FloatArray, threshold: int, price_ratio: float) -> float:
    """Cost in owned-replica-hours of serving ``demand`` (per minute) with ``threshold`` owned."""
    need = np.ceil(np.asarray(demand, dtype=np.float64) - 1e-9)
    over = np.maximum(need - threshold, 0.0)
    return float(threshold * need.size / 60.0 + price_ratio * over.sum() / 60.0)


@dataclass(frozen=True)
class Forecast:
    """What the predictor says about the next day."""

    threshold_replicas: int
    """Replicas to keep on owned nodes (manual override, else fitted, capped by capacity)."""
    fitted_threshold: int
    profile: tuple[float, ...]
    """Typical replica demand for each minute of the next day."""
    floor: tuple[float, ...]
    """Demand every recent day reached at that minute: safe to schedule by cron."""
    growth: tuple[float, ...]
    """Expected demand growth (>= 1) from each minute to ``lead_minutes`` later."""
    peak_replicas: float
    ramp_headroom: float
    """Highest relative rise within the lead time that ``growth`` did not explain."""
    spare_replicas: int
    """Whole replicas to keep ready beyond the relative headroom (bursty services only)."""
    trend_gain: float
    fitted_days: int
    manual: bool = False

    def plan(
        self, demand: FloatArray, start_minute: int = 0, previous: float | None = None
    ) -> NDArray[np.int64]:
        """Replicas to run for observed per-minute ``demand`` (decided one lead time ahead).

        The HPA side of the target: load plus ``trend_gain`` of its last rise, scaled by the
        expected growth, with the relative headroom, plus spare replicas. ``start_minute`` is
        the minute of day of ``demand[0]``; ``previous`` the load of the minute before it.
        """
        d = np.asarray(demand, dtype=np.float64)
        if d.size == 0:
            return np.zeros(0, dtype=np.int64)
        idx = (np.arange(d.size) + start_minute) % MINUTES_PER_DAY
        growth = np.asarray(self.growth)[idx]
        before = d[0] if previous is None else previous
        load = d + self.trend_gain * np.maximum(np.diff(d, prepend=before), 0.0)
        planned = np.ceil(load * growth * (1.0 + self.ramp_headroom) - 1e-9).astype(np.int64)
        return planned + self.spare_replicas


@dataclass(frozen=True)
class BacktestReport:
    """Walk-forward error: each day predicted from the days before it only."""

    days: int
    peak_mape: float
    """Mean absolute percentage error of the predicted daily peak."""
    peak_bias: float
    """Mean signed error of the peak (positive: over-forecast)."""
    underforecast_minutes: float
    """Fraction of minutes whose demand exceeded the profile forecast."""
    threshold_regret: float
    """Extra cost of the predicted threshold over the day's hindsight-optimal one (fraction)."""


@dataclass(frozen=True)
class ThresholdPredictor:
    price_ratio: float = 1.5
    window_days: int = 7
    smoothing_minutes: int = 15
    lead_minutes: int = 1
    ramp_quantile: float = 1.0
    headroom_safety: float = 1.25
    """Multiplies the largest residual rise seen: the next week brings new extremes. At 1.0
    synthetic traces lose a few SLO minutes; 1.25 kept four seeds at zero."""
    trend_gain: float = 0.5
    """Adds this share of the last minute's rise to the load: a burst's first minute is a
    surprise, its next minutes are not, so the fixed headroom need only cover the first."""
    capacity_replicas: int | None = None
    """What the owned nodes can carry within their ceiling; the threshold never exceeds it."""
    manual_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.window_days < 1:
            raise ConfigError(f"predictor window must be >= 1 day, got {self.window_days}")
        if self.price_ratio <= 0:
            raise ConfigError(f"price ratio must be positive, got {self.price_ratio}")

    def fit(self, history: FloatArray) -> Forecast:
        """Forecast the day after ``history`` (per-minute demand, whole days, oldest first)."""
        h = np.asarray(history, dtype=np.float64)
        days = h.size // MINUTES_PER_DAY
        if days < 1:
            raise ConfigError(
                f"the predictor needs at least one whole day of history, got {h.size} minutes"
            )
        recent = h[(days - min(days, self.window_days)) * MINUTES_PER_DAY : days * MINUTES_PER_DAY]
        by_day = recent.reshape(-1, MINUTES_PER_DAY)
        profile = _rolling_mean(by_day.mean(axis=0), self.smoothing_minutes)
        lead = self.lead_minutes
        growth = np.clip(np.roll(profile, -lead) / np.maximum(profile, 1.0), 1.0, MAX_GROWTH)
        flat = by_day.reshape(-1)
        trend = self.trend_gain * np.maximum(np.diff(flat, prepend=flat[0]), 0.0)
        base = (flat + trend) * np.tile(growth, by_day.shape[0])
        expected = base[:-lead]
        # the SLO is on whole replicas, so the residual compares rounded-up demand
        future = flat[lead:]
        residual = (future - expected) / np.maximum(expected, 1.0)
        headroom = float(np.quantile(residual, self.ramp_quantile)) if residual.size else 0.0
        headroom = (
            min(max(0.0, headroom * self.headroom_safety), MAX_HEADROOM)
            if math.isfinite(headroom)
            else 0.0
        )
        # what relative headroom could not cover (bursts out of near-silence): whole spare
        # replicas, sized by the largest such miss on the history; zero for smooth services
        covered = np.ceil(expected * (1.0 + headroom) - 1e-9)
        missed = np.ceil(future - 1e-9) - covered
        spare = math.ceil(
            max(0.0, float(missed.max()) if missed.size else 0.0) * self.headroom_safety
        )
        # size owned capacity for what will actually run (demand plus headroom and spare
        # replicas), not for bare demand: always-on spare replicas are cheaper owned
        planned = np.ceil(base * (1.0 + headroom) - 1e-9) + spare
        fitted = optimal_threshold(planned.astype(np.float64), self.price_ratio)
        threshold = fitted
        if self.capacity_replicas is not None:
            threshold = min(threshold, self.capacity_replicas)
        manual = self.manual_threshold is not None
        if self.manual_threshold is not None:
            threshold = self.manual_threshold
        return Forecast(
            threshold_replicas=threshold,
            fitted_threshold=fitted,
            profile=tuple(float(x) for x in profile),
            floor=tuple(float(x) for x in by_day.min(axis=0)),
            growth=tuple(float(x) for x in growth),
            peak_replicas=float(by_day.max(axis=1).mean()),
            ramp_headroom=headroom,
            spare_replicas=spare,
            trend_gain=self.trend_gain,
            fitted_days=by_day.shape[0],
            manual=manual,
        )

    def backtest(self, history: FloatArray, min_train_days: int = 2) -> BacktestReport:
        """Predict each day from the days before it; never a day it was fitted on."""
        h = np.asarray(history, dtype=np.float64)
        days = h.size // MINUTES_PER_DAY
        if days <= min_train_days:
            raise ConfigError(
                f"backtest needs more than {min_train_days} days of history, got {days}"
            )
        ape, bias, under, regret = [], [], [], []
        for d in range(min_train_days, days):
            fc = self.fit(h[: d * MINUTES_PER_DAY])
            actual = h[d * MINUTES_PER_DAY : (d + 1) * MINUTES_PER_DAY]
            peak = float(actual.max())
            ape.append(abs(fc.peak_replicas - peak) / max(peak, 1.0))
            bias.append((fc.peak_replicas - peak) / max(peak, 1.0))
            under.append(float(np.mean(actual > np.asarray(fc.profile) + 1e-9)))
            # regret on what would have run that day: the threshold is for planned replicas
            ran = fc.plan(actual, previous=float(h[d * MINUTES_PER_DAY - 1])).astype(np.float64)
            best = threshold_cost(ran, optimal_threshold(ran, self.price_ratio), self.price_ratio)
            got = threshold_cost(ran, fc.fitted_threshold, self.price_ratio)
            regret.append(got / best - 1.0 if best > 0 else 0.0)
        return BacktestReport(
            days=len(ape),
            peak_mape=float(np.mean(ape)),
            peak_bias=float(np.mean(bias)),
            underforecast_minutes=float(np.mean(under)),
            threshold_regret=float(np.mean(regret)),
        )


def _rolling_mean(x: FloatArray, width: int) -> FloatArray:
    """Centred rolling mean over a circular day (peaks shift a little from day to day)."""
    if width <= 1:
        return x.copy()
    half = width // 2
    padded = np.concatenate([x[-half:], x, x[:half]])
    out: FloatArray = np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), "valid")
    return out
