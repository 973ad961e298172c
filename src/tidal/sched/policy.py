"""Tidal's replica policy: what to keep ready, fitted on a service's history only.

The same code plans the simulator's ``tidal`` policy and the controller's thresholds. At each
minute the target is the load extrapolated by its last rise over the creation latency, never
below the **cron floor** (what every history day needed one latency later: a daily step is
scheduled, not a surprise), plus a **reserve** of whole replicas for what that misses on the
history days, raised to the Gumbel level of the daily largest misses for a return period. The
owned threshold is the cost-optimal one for those targets at the price ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.predictor import gumbel_return_level, optimal_threshold

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

DEFAULT_RETURN_PERIOD_DAYS = 5.0
"""Chosen on synthetic seeds 1-5 (cost at or below reactive-reserve with zero SLO minutes);
the tests and the benchmark check it on other seeds and scenarios."""


@dataclass(frozen=True)
class Reserve:
    """Tidal's spare replicas for one service, as fitted on the training days."""

    replicas: int
    in_sample_max: float
    """The largest miss of extrapolation + floor on any training minute."""
    return_level: float | None
    """The Gumbel level of the daily maxima (None: fewer than three days, or no spread)."""
    days: int
    floor_peak: float
    """The highest value of the cron floor (what every training day reached at that minute)."""


def observe(demand: FloatArray, smoothing_minutes: int) -> FloatArray:
    """What a policy sees of the load as each minute starts: the raw demand of that minute, or
    its trailing (causal) mean over ``smoothing_minutes``."""
    d = np.asarray(demand, dtype=np.float64)
    if smoothing_minutes <= 1:
        return d.copy()
    kernel = np.ones(smoothing_minutes) / smoothing_minutes
    padded = np.concatenate([np.full(smoothing_minutes - 1, d[0] if d.size else 0.0), d])
    out: FloatArray = np.convolve(padded, kernel, "valid")
    return out


def rises_covered(base: FloatArray, need: FloatArray, lead: int) -> FloatArray:
    """``need[t + lead] - base[t]``: what a target of ``base`` decided at ``t`` lacks when its
    pods are ready (0 for the last ``lead`` minutes, whose future is not in the array)."""
    out = np.zeros(base.size)
    if lead == 0:
        out[:] = need - base
    elif base.size > lead:
        out[:-lead] = need[lead:] - base[:-lead]
    return out


def ceil_replicas(x: FloatArray) -> IntArray:
    return np.ceil(np.asarray(x, dtype=np.float64) - 1e-9).astype(np.int64)


def trend_base(obs: FloatArray, lead: int, gain: float, previous: float) -> FloatArray:
    rise = np.maximum(np.diff(obs, prepend=previous), 0.0)
    out: FloatArray = obs + gain * lead * rise
    return out


def floor_ahead(train: FloatArray, lead: int) -> FloatArray:
    """For each minute of the day, what every training day needed ``lead`` minutes later."""
    days = train[: train.size // MINUTES_PER_DAY * MINUTES_PER_DAY].reshape(-1, MINUTES_PER_DAY)
    out: FloatArray = np.roll(days.min(axis=0), -lead)
    return out


def tidal_base(
    obs: FloatArray, floor: FloatArray, lead: int, gain: float, prev: float
) -> FloatArray:
    reps = obs.size // MINUTES_PER_DAY
    out: FloatArray = np.maximum(trend_base(obs, lead, gain, prev), np.tile(floor, reps))
    return out


def fit_reserve(
    base: FloatArray, demand: FloatArray, lead: int, return_period: float | None
) -> tuple[int, int, float | None, int]:
    """Whole replicas to add to ``ceil(base)`` so that every minute of ``demand`` is covered
    one lead time later: the largest miss, or with ``return_period`` the Gumbel level of the
    daily largest misses if that is more (at least three days with some spread)."""
    need = np.ceil(demand - 1e-9)
    miss = rises_covered(np.ceil(base - 1e-9), need, lead)
    top = max(0, int(miss.max())) if miss.size else 0
    # the law is fitted to the fractional misses (need - base): whole replicas heap the daily
    # maxima on a few values, and identical maxima would say the tail is empty
    frac = rises_covered(base, need, lead)
    days = frac.size // MINUTES_PER_DAY
    daily = frac[: days * MINUTES_PER_DAY].reshape(days, MINUTES_PER_DAY).max(axis=1)
    level = None
    if return_period is not None and days >= 3 and float(np.std(daily)) > 0:
        level = max(0.0, gumbel_return_level(daily, return_period))
    return max(top, math.ceil((level or 0.0) - 1e-9)), top, level, days


@dataclass(frozen=True)
class TidalFit:
    """Tidal's plan for one service, fitted on its history."""

    threshold_replicas: int
    """Replicas to keep on owned nodes (manual override, else fitted, capped by capacity)."""
    fitted_threshold: int
    reserve: Reserve
    floor: FloatArray = field(repr=False)
    """Per minute of the day: what every history day needed ``lead`` minutes later."""
    history_targets: IntArray = field(repr=False)
    lead_minutes: int = 1
    trend_gain: float = 1.0
    manual: bool = False

    def targets(self, observed: FloatArray, previous: float) -> IntArray:
        """Replicas to run for the observed load (whole days from midnight); ``previous``: the
        load observed the minute before."""
        base = tidal_base(observed, self.floor, self.lead_minutes, self.trend_gain, previous)
        return ceil_replicas(base) + int(self.reserve.replicas)


@dataclass(frozen=True)
class TidalPolicy:
    price_ratio: float = 1.5
    """Virtual price over owned, per replica."""
    lead_minutes: int = 1
    trend_gain: float = 1.0
    return_period_days: float = DEFAULT_RETURN_PERIOD_DAYS
    smoothing_minutes: int = 1
    capacity_replicas: int | None = None
    """What the owned nodes can carry within their ceiling; the threshold never exceeds it."""
    manual_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.price_ratio <= 0:
            raise ConfigError(f"price ratio must be positive, got {self.price_ratio}")
        if self.lead_minutes < 0:
            raise ConfigError(f"lead must be >= 0 minutes, got {self.lead_minutes}")
        if self.return_period_days <= 1:
            raise ConfigError("the reserve's return period must be more than one day")

    def fit(self, history: FloatArray, hindsight_on: FloatArray | None = None) -> TidalFit:
        """Fit on ``history`` (per-minute demand, whole days, oldest first). ``hindsight_on``:
        fit the reserve on those (evaluated) days instead, with no return level: a bound."""
        h = np.asarray(history, dtype=np.float64)
        days = h.size // MINUTES_PER_DAY
        if days < 1:
            raise ConfigError(
                f"Tidal's policy needs at least one whole day of history, got {h.size} minutes"
            )
        h = h[-days * MINUTES_PER_DAY :]
        obs = observe(h, self.smoothing_minutes)
        floor = floor_ahead(h, self.lead_minutes)
        base = tidal_base(obs, floor, self.lead_minutes, self.trend_gain, float(obs[0]))
        r, top, level, fitted_days = fit_reserve(
            base, h, self.lead_minutes, self.return_period_days
        )
        if hindsight_on is not None:
            ev = np.asarray(hindsight_on, dtype=np.float64)
            ev_obs = observe(np.concatenate([h, ev]), self.smoothing_minutes)[h.size :]
            ev_base = tidal_base(ev_obs, floor, self.lead_minutes, self.trend_gain, float(obs[-1]))
            r = fit_reserve(ev_base, ev, self.lead_minutes, None)[0]
        targets = ceil_replicas(base) + r
        fitted = optimal_threshold(targets.astype(np.float64), self.price_ratio)
        threshold = fitted
        if self.capacity_replicas is not None:
            threshold = min(threshold, self.capacity_replicas)
        if self.manual_threshold is not None:
            threshold = self.manual_threshold
        return TidalFit(
            threshold,
            fitted,
            Reserve(r, top, level, fitted_days, float(floor.max())),
            floor,
            targets,
            self.lead_minutes,
            self.trend_gain,
            self.manual_threshold is not None,
        )
