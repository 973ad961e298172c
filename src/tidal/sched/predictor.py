"""Threshold predictor: how many replicas of a service should live on owned nodes.

Owned capacity is paid every hour, virtual capacity only while used but at ``price_ratio``
times the price. For a fixed owned capacity T the cost over a period is
``T * hours + price_ratio * (replica-hours above T)``, which is lowest where demand exceeds T
for ``1 / price_ratio`` of the time. The predictor fits that threshold on past days, caps it
by what the owned nodes can carry within their ceiling, and lets an operator override it.

It also plans replicas minute by minute. A virtual pod asked for now serves only after the
creation latency, so the target is a forecast of the load one latency ahead: the load seen,
plus its last rise (a ramp goes on), times the growth the typical day expects over the
latency (the mean of the recent days, smoothed); the floor profile (what every recent day
needed at that minute) becomes cron rules. What the forecast misses is covered by a margin
learned on **held-out** days: each recent day is forecast from the days before it only, and
the margin is the cheapest ``load_fraction * forecast + peak_fraction * scale`` (``scale``: the
largest daily peak seen) that covers every miss on those days. Noise scales with the load;
bursts of requests arriving together scale with the service's size, whatever the hour, and a
burst out of silence is the one a relative margin never covers. Tomorrow brings misses no
held-out day showed, so the margin is scaled by a Gumbel fit to the held-out days' maxima for a
return period (default: a day needing more is expected once a year per service). It only ever
sees days before the one it predicts; :func:`backtest` walks forward the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError
from tidal.sched.autoscale import MINUTES_PER_DAY

FloatArray = NDArray[np.float64]

MAX_GROWTH = 2.0
"""The forecast may at most double the observed load within the lead time; a near-empty
typical minute followed by a busier one would otherwise ask for absurd replica counts."""
LOAD_FRACTIONS = tuple(i / 100 for i in range(101))
"""Candidate ``load_fraction`` values of the margin (0 to 100 % of the forecast)."""
FALLBACK_SAFETY = 1.5
"""Scales the margin when too few held-out days missed anything to fit a law to."""
MIN_GUMBEL_DAYS = 3
"""A two-parameter law through two points says nothing about its tail."""
EULER_GAMMA = 0.5772156649


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
class Margin:
    """Replicas kept ready beyond the forecast ``f``: ``safety * (load_fraction * f +
    peak_fraction * scale_replicas)``."""

    load_fraction: float
    peak_fraction: float
    scale_replicas: float
    """The largest daily peak of the days fitted on: bursts are measured against it."""
    safety: float
    """Return-level factor for misses larger than any held-out day showed (>= 1)."""
    heldout_days: int
    """Days the fractions were learned on, each forecast from the days before it."""

    def replicas(self, forecast: FloatArray) -> FloatArray:
        f = np.asarray(forecast, dtype=np.float64)
        extra: FloatArray = self.safety * (
            self.load_fraction * f + self.peak_fraction * self.scale_replicas
        )
        return extra


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
    margin: Margin
    trend_gain: float
    fitted_days: int
    manual: bool = False

    @property
    def ramp_headroom(self) -> float:
        """The relative part of the margin (a fraction of the forecast load)."""
        return self.margin.safety * self.margin.load_fraction

    @property
    def spare_replicas(self) -> float:
        """The absolute part of the margin: replicas kept ready whatever the load."""
        return self.margin.safety * self.margin.peak_fraction * self.margin.scale_replicas

    def expected(
        self, demand: FloatArray, start_minute: int = 0, previous: float | None = None
    ) -> FloatArray:
        """Load forecast one lead time ahead: load plus ``trend_gain`` of its last rise, times
        the expected growth. ``start_minute``: minute of day of ``demand[0]``; ``previous``:
        the load of the minute before it."""
        d = np.asarray(demand, dtype=np.float64)
        idx = (np.arange(d.size) + start_minute) % MINUTES_PER_DAY
        before = (d[0] if d.size else 0.0) if previous is None else previous
        load = extrapolate(d, before, self.trend_gain)
        out: FloatArray = load * np.asarray(self.growth)[idx]
        return out

    def plan(
        self,
        demand: FloatArray,
        start_minute: int = 0,
        previous: float | None = None,
        margin: Margin | None = None,
    ) -> NDArray[np.int64]:
        """Replicas to run for observed per-minute ``demand`` (decided one lead time ahead).

        The HPA side of the target: the forecast plus the margin (``margin`` overrides the
        learned one, for what-if runs).
        """
        f = self.expected(demand, start_minute, previous)
        m = self.margin if margin is None else margin
        return np.ceil(f + m.replicas(f) - 1e-9).astype(np.int64)


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
    short_days: float = 0.0
    """Fraction of days on which the plan left a minute short (what the SLO would see)."""


def extrapolate(demand: FloatArray, previous: float, gain: float) -> FloatArray:
    """The load plus ``gain`` times its last rise (never its fall: scale-in can wait)."""
    d = np.asarray(demand, dtype=np.float64)
    out: FloatArray = d + gain * np.maximum(np.diff(d, prepend=previous), 0.0)
    return out


def fit_margin(
    forecast: FloatArray, residual: FloatArray, scale: FloatArray, price_ratio: float
) -> tuple[float, float]:
    """``(load_fraction, peak_fraction)`` of the cheapest margin covering every ``residual``.

    ``residual[t]`` is the demand one lead time after minute ``t`` minus ``forecast[t]``;
    ``scale[t]`` the service's largest daily peak known then. For each load fraction the peak
    fraction is the least that covers all residuals; the pair whose planned replicas cost least
    (with the owned threshold optimal for them) wins.
    """
    f = np.asarray(forecast, dtype=np.float64)
    r = np.asarray(residual, dtype=np.float64)
    p = np.maximum(np.asarray(scale, dtype=np.float64), 1.0)
    if f.size == 0 or not np.any(r > 0):
        return 0.0, 0.0
    best: tuple[float, float, float] | None = None
    for b in LOAD_FRACTIONS:
        a = max(0.0, float(((r - b * f) / p).max()))
        planned = np.ceil(f * (1.0 + b) + a * p - 1e-9)
        cost = threshold_cost(planned, optimal_threshold(planned, price_ratio), price_ratio)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, b, a)
    assert best is not None
    return best[1], best[2]


def gumbel_return_level(maxima: FloatArray, return_period: float) -> float:
    """The value a Gumbel law fitted to ``maxima`` (method of moments) exceeds once in
    ``return_period`` draws."""
    z = np.asarray(maxima, dtype=np.float64)
    beta = float(z.std(ddof=1)) * math.sqrt(6.0) / math.pi
    mu = float(z.mean()) - EULER_GAMMA * beta
    return mu - beta * math.log(-math.log(1.0 - 1.0 / return_period))


@dataclass(frozen=True)
class ThresholdPredictor:
    price_ratio: float = 1.5
    window_days: int = 7
    smoothing_minutes: int = 15
    lead_minutes: int = 1
    trend_gain: float = 1.0
    """Share of the last minute's rise added to the load: 1.0 extrapolates a ramp linearly,
    so only a burst's first minute is a surprise. Choosing it per service on held-out days
    picked 0 whenever those days held no burst, and then missed the next burst's ramp."""
    return_period_days: float = 365.0
    """The margin is sized so that a day needing more is expected once in this many days."""
    capacity_replicas: int | None = None
    """What the owned nodes can carry within their ceiling; the threshold never exceeds it."""
    manual_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.window_days < 1:
            raise ConfigError(f"predictor window must be >= 1 day, got {self.window_days}")
        if self.price_ratio <= 0:
            raise ConfigError(f"price ratio must be positive, got {self.price_ratio}")
        if self.return_period_days <= 1:
            raise ConfigError(
                f"return period must be more than one day, got {self.return_period_days}"
            )

    def _profile(self, h: FloatArray, day: int) -> tuple[FloatArray, FloatArray, float]:
        """Profile, growth and scale known before day ``day`` (its window of days only)."""
        lo = max(0, day - self.window_days)
        by_day = h[lo * MINUTES_PER_DAY : day * MINUTES_PER_DAY].reshape(-1, MINUTES_PER_DAY)
        profile = _rolling_mean(by_day.mean(axis=0), self.smoothing_minutes)
        growth = np.clip(
            np.roll(profile, -self.lead_minutes) / np.maximum(profile, 1.0), 1.0, MAX_GROWTH
        )
        return profile, growth, float(by_day.max())

    def heldout_misses(
        self, h: FloatArray, days: int
    ) -> list[tuple[FloatArray, FloatArray, FloatArray]]:
        """``(forecast, residual, scale)`` per minute of each recent day, forecast from the
        days before it only (at most the window's last ``window_days`` days)."""
        out = []
        lead = self.lead_minutes
        for k in range(max(1, days - self.window_days), days):
            _, growth, scale = self._profile(h, k)
            s = k * MINUTES_PER_DAY
            d = h[s : s + MINUTES_PER_DAY]
            load = extrapolate(d, float(h[s - 1]), self.trend_gain)
            future = h[s + lead : s + MINUTES_PER_DAY + lead]
            f = (load * growth)[: future.size]
            out.append((f, future - f, np.full(f.size, scale)))
        return out

    def _safety(
        self,
        parts: list[tuple[FloatArray, FloatArray, FloatArray]],
        load_fraction: float,
        peak_fraction: float,
    ) -> float:
        """How much to scale the margin for misses no held-out day showed.

        Each held-out day's worst miss as a share of the margin (1.0 on the day that set it) is
        a draw of the daily maximum. Days that missed nothing say only how often days miss: the
        return level is that of the days that did, for a period shortened by how rarely they
        occur (a Gumbel law fitted to a sample with a heap at zero would be wrong).
        """
        shares = []
        for fk, rk, pk in parts:
            hit = rk > 0
            if hit.any():
                m = load_fraction * fk[hit] + peak_fraction * np.maximum(pk[hit], 1.0)
                shares.append(float((rk[hit] / m).max()))
        if len(shares) < MIN_GUMBEL_DAYS:
            return FALLBACK_SAFETY if shares else 1.0
        period = self.return_period_days * len(shares) / len(parts)
        if period <= 1:
            return FALLBACK_SAFETY
        return max(1.0, gumbel_return_level(np.array(shares), period))

    def fit(self, history: FloatArray) -> Forecast:
        """Forecast the day after ``history`` (per-minute demand, whole days, oldest first)."""
        h = np.asarray(history, dtype=np.float64)
        days = h.size // MINUTES_PER_DAY
        if days < 1:
            raise ConfigError(
                f"the predictor needs at least one whole day of history, got {h.size} minutes"
            )
        h = h[: days * MINUTES_PER_DAY]
        profile, growth, scale = self._profile(h, days)
        lo = max(0, days - self.window_days)
        by_day = h[lo * MINUTES_PER_DAY :].reshape(-1, MINUTES_PER_DAY)
        parts = self.heldout_misses(h, days)
        if not parts:  # one day only: its own misses, forecast with its own profile
            d = h[:-1]
            f = extrapolate(d, float(d[0]), self.trend_gain) * growth[: d.size]
            parts = [(f, h[1:] - f, np.full(f.size, scale))]
        f, r, p = (np.concatenate([part[i] for part in parts]) for i in range(3))
        load_fraction, peak_fraction = fit_margin(f, r, p, self.price_ratio)
        safety = FALLBACK_SAFETY
        if days >= 2:
            safety = self._safety(parts, load_fraction, peak_fraction)
        margin = Margin(load_fraction, peak_fraction, scale, safety, len(parts) if days >= 2 else 0)
        fc = Forecast(
            threshold_replicas=0,
            fitted_threshold=0,
            profile=tuple(float(x) for x in profile),
            floor=tuple(float(x) for x in by_day.min(axis=0)),
            growth=tuple(float(x) for x in growth),
            peak_replicas=float(by_day.max(axis=1).mean()),
            margin=margin,
            trend_gain=self.trend_gain,
            fitted_days=by_day.shape[0],
        )
        # size owned capacity for what will actually run (forecast plus margin), not for bare
        # demand: the part of the margin that is always on is cheaper owned
        recent = by_day.reshape(-1)
        planned = fc.plan(recent, previous=float(h[lo * MINUTES_PER_DAY - 1]) if lo else None)
        fitted = optimal_threshold(planned.astype(np.float64), self.price_ratio)
        threshold = fitted
        if self.capacity_replicas is not None:
            threshold = min(threshold, self.capacity_replicas)
        if self.manual_threshold is not None:
            threshold = self.manual_threshold
        return replace(
            fc,
            threshold_replicas=threshold,
            fitted_threshold=fitted,
            manual=self.manual_threshold is not None,
        )

    def backtest(self, history: FloatArray, min_train_days: int = 2) -> BacktestReport:
        """Predict each day from the days before it; never a day it was fitted on."""
        h = np.asarray(history, dtype=np.float64)
        days = h.size // MINUTES_PER_DAY
        if days <= min_train_days:
            raise ConfigError(
                f"backtest needs more than {min_train_days} days of history, got {days}"
            )
        ape, bias, under, regret, short = [], [], [], [], []
        lead = self.lead_minutes
        for d in range(min_train_days, days):
            fc = self.fit(h[: d * MINUTES_PER_DAY])
            s = d * MINUTES_PER_DAY
            actual = h[s : s + MINUTES_PER_DAY]
            peak = float(actual.max())
            ape.append(abs(fc.peak_replicas - peak) / max(peak, 1.0))
            bias.append((fc.peak_replicas - peak) / max(peak, 1.0))
            under.append(float(np.mean(actual > np.asarray(fc.profile) + 1e-9)))
            # regret on what would have run that day: the threshold is for planned replicas
            ran = fc.plan(actual, previous=float(h[s - 1])).astype(np.float64)
            best = threshold_cost(ran, optimal_threshold(ran, self.price_ratio), self.price_ratio)
            got = threshold_cost(ran, fc.fitted_threshold, self.price_ratio)
            regret.append(got / best - 1.0 if best > 0 else 0.0)
            future = np.ceil(h[s + lead : s + MINUTES_PER_DAY + lead] - 1e-9)
            short.append(float(np.any(ran[: future.size] < future)))
        return BacktestReport(
            days=len(ape),
            peak_mape=float(np.mean(ape)),
            peak_bias=float(np.mean(bias)),
            underforecast_minutes=float(np.mean(under)),
            threshold_regret=float(np.mean(regret)),
            short_days=float(np.mean(short)),
        )


def _rolling_mean(x: FloatArray, width: int) -> FloatArray:
    """Centred rolling mean over a circular day (peaks shift a little from day to day)."""
    if width <= 1:
        return x.copy()
    half = width // 2
    padded = np.concatenate([x[-half:], x, x[:half]])
    out: FloatArray = np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), "valid")
    return out
