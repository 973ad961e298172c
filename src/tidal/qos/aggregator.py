"""Data aggregator: a profile per container and per application from the collector's samples.

Three sliding windows (1 min, 5 min, 1 h) with percentiles, an EWMA for the current level, and
a daily-periodic + linear-trend model for short-term prediction of the tidal pattern that
online services show (a daily peak of a few hours). Everything here is pure: times are passed
in, so tests drive it with a synthetic clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

WINDOWS_S = {"1m": 60.0, "5m": 300.0, "1h": 3600.0}
DEFAULT_EWMA_HALF_LIFE_S = 10.0
DAY_S = 86_400.0
DEFAULT_BUCKET_S = 300.0
"""Prediction history is kept as 5-minute means: 288 points a day, 14 days in ~4k floats."""
DEFAULT_HISTORY_DAYS = 14


@dataclass(frozen=True)
class WindowStats:
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class SlidingWindow:
    """(time, value) pairs younger than ``horizon_s``."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._items: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        self._items.append((t, value))
        self._expire(t)

    def _expire(self, now: float) -> None:
        while self._items and now - self._items[0][0] > self.horizon_s:
            self._items.popleft()

    def stats(self, now: float) -> WindowStats | None:
        self._expire(now)
        if not self._items:
            return None
        values = sorted(v for _, v in self._items)
        return WindowStats(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            p99=percentile(values, 99),
            max=values[-1],
        )


class Ewma:
    """Exponentially weighted moving average with a half-life in seconds (irregular samples)."""

    def __init__(self, half_life_s: float = DEFAULT_EWMA_HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self.value: float | None = None
        self._t: float | None = None

    def add(self, t: float, value: float) -> float:
        if self.value is None or self._t is None:
            self.value = value
        else:
            alpha = 1 - 0.5 ** (max(0.0, t - self._t) / self.half_life_s)
            self.value += alpha * (value - self.value)
        self._t = t
        return self.value


class SeasonalTrendModel:
    """Daily-periodic + linear trend: ``y(t) = a + b*t + s[(t mod period) // bucket]``.

    Fit by least squares for the trend, then the mean residual per phase bucket for the season
    (centred, so trend and season do not fight over the level). Needs one full period to model
    the season; with less it predicts trend only.

    Plain Python rather than numpy: the QoS agent runs on
    every node, and a node does not install numpy (it is the ``sched``/``bench`` extras'). The
    history is at most a few thousand buckets and the aggregator refits only when it grows.
    """

    def __init__(self, period_s: float = DAY_S, bucket_s: float = DEFAULT_BUCKET_S) -> None:
        if period_s % bucket_s:
            raise ValueError("period must be a whole number of buckets")
        self.period_s = period_s
        self.bucket_s = bucket_s
        self.n_buckets = int(period_s // bucket_s)
        self.intercept = 0.0
        self.slope = 0.0
        self.season = [0.0] * self.n_buckets
        self.fitted = False

    def _bucket(self, t: float) -> int:
        return int((t % self.period_s) // self.bucket_s)

    def fit(self, times: Iterable[float], values: Iterable[float]) -> None:
        t = [float(v) for v in times]
        y = [float(v) for v in values]
        if len(t) < 2:
            raise ValueError("need at least two points to fit a trend")
        if len(t) != len(y):
            raise ValueError(f"{len(t)} times but {len(y)} values")
        self.slope, self.intercept = _line(t, y)
        self.season = [0.0] * self.n_buckets
        if max(t) - min(t) >= self.period_s - self.bucket_s:
            sums = [0.0] * self.n_buckets
            counts = [0] * self.n_buckets
            buckets = [self._bucket(ti) for ti in t]
            for ti, yi, b in zip(t, y, buckets, strict=True):
                sums[b] += yi - (self.intercept + self.slope * ti)
                counts[b] += 1
            seen = [sums[b] / counts[b] for b in range(self.n_buckets) if counts[b]]
            level = math.fsum(seen) / len(seen)
            self.season = [
                sums[b] / counts[b] - level if counts[b] else -level for b in range(self.n_buckets)
            ]
            # Refit the trend on deseasonalised data: a partial extra day biases the first fit.
            self.slope, self.intercept = _line(
                t, [yi - self.season[b] for yi, b in zip(y, buckets, strict=True)]
            )
        self.fitted = True

    def predict(self, t: float | Iterable[float]) -> list[float]:
        ts = [float(t)] if isinstance(t, int | float) else [float(v) for v in t]
        return [self.intercept + self.slope * v + self.season[self._bucket(v)] for v in ts]


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` on centred sums (``statistics.linear_regression``
    is exact but ~50x slower on a few thousand points); flat at the mean if all ``x`` are equal."""
    n = len(x)
    x_mean, y_mean = sum(x) / n, sum(y) / n
    dx = [xi - x_mean for xi in x]
    sxx = sum(d * d for d in dx)
    if sxx == 0:
        return 0.0, y_mean
    slope = sum(d * (yi - y_mean) for d, yi in zip(dx, y, strict=True)) / sxx
    return slope, y_mean - slope * x_mean


@dataclass(frozen=True)
class Profile:
    """What the aggregator knows about one container or application."""

    key: str
    ewma: float | None
    windows: dict[str, WindowStats | None]
    predicted_next_hour: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "ewma": self.ewma,
            "windows": {k: (v.to_dict() if v else None) for k, v in self.windows.items()},
            "predicted_next_hour": self.predicted_next_hour,
        }


class _Series:
    def __init__(self, half_life_s: float, bucket_s: float, history_days: int) -> None:
        self.windows = {name: SlidingWindow(h) for name, h in WINDOWS_S.items()}
        self.ewma = Ewma(half_life_s)
        self.bucket_s = bucket_s
        self.history: deque[tuple[float, float]] = deque(
            maxlen=int(history_days * DAY_S / bucket_s)
        )
        self._bucket_start: float | None = None
        self._bucket_sum = 0.0
        self._bucket_n = 0
        self.model: SeasonalTrendModel | None = None
        """Fitted on ``history`` as it was when ``model_stale`` was last cleared."""
        self.model_stale = True

    def add(self, t: float, value: float) -> None:
        for w in self.windows.values():
            w.add(t, value)
        self.ewma.add(t, value)
        start = t - t % self.bucket_s
        if self._bucket_start is not None and start != self._bucket_start and self._bucket_n:
            self.history.append(
                (self._bucket_start + self.bucket_s / 2, self._bucket_sum / self._bucket_n)
            )
            self.model_stale = True
            self._bucket_sum, self._bucket_n = 0.0, 0
        self._bucket_start = start
        self._bucket_sum += value
        self._bucket_n += 1


class Aggregator:
    """Profiles of one metric (e.g. CPU cores) per container and per application label.

    ``now`` is the caller's clock: wall-clock seconds for the daily model to line up with the
    day. An application's series is the sum of its containers' values at each timestamp.
    """

    def __init__(
        self,
        half_life_s: float = DEFAULT_EWMA_HALF_LIFE_S,
        bucket_s: float = DEFAULT_BUCKET_S,
        history_days: int = DEFAULT_HISTORY_DAYS,
    ) -> None:
        self._args = (half_life_s, bucket_s, history_days)
        self._series: dict[str, _Series] = {}

    def _get(self, key: str) -> _Series:
        if key not in self._series:
            self._series[key] = _Series(*self._args)
        return self._series[key]

    def ingest(self, t: float, values: dict[str, float], apps: dict[str, str]) -> None:
        """Add one round: ``values`` per container, ``apps`` maps container -> application."""
        per_app: dict[str, float] = {}
        for key, value in values.items():
            self._get(key).add(t, value)
            app = apps.get(key)
            if app:
                per_app[app] = per_app.get(app, 0.0) + value
        for app, total in per_app.items():
            self._get(f"app:{app}").add(t, total)

    def add(self, key: str, t: float, value: float) -> None:
        """Add one value to any named series (e.g. ``latency:web``)."""
        self._get(key).add(t, value)

    def keys(self) -> list[str]:
        return sorted(self._series)

    def profile(self, key: str, now: float) -> Profile | None:
        s = self._series.get(key)
        if s is None:
            return None
        return Profile(
            key=key,
            ewma=s.ewma.value,
            windows={name: w.stats(now) for name, w in s.windows.items()},
            predicted_next_hour=self.predict(key, now + 3600),
        )

    def predict(self, key: str, t: float) -> float | None:
        """Predicted value at time ``t`` from the bucketed history; None with too little data."""
        s = self._series.get(key)
        if s is None or len(s.history) < 4:
            return None
        if s.model is None or s.model_stale:
            # The history changes once a bucket (5 min); profiles are read every round.
            s.model = SeasonalTrendModel(DAY_S, s.bucket_s)
            s.model.fit((ti for ti, _ in s.history), (v for _, v in s.history))
            s.model_stale = False
        return s.model.predict(t)[0]
