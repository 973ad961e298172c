"""Per-minute replica demand for many services: a seeded synthetic tide and real traces.

A :class:`DemandTrace` is whole days of minutes starting at midnight, one demand series per
service, in replica-equivalents (the load that one replica carries at 100 %). The synthetic
generator draws the shape the write-up describes: a daily peak of about four hours, weekly
variation, smooth noise and occasional bursts. :func:`load_request_trace` turns a request-level
trace (request time + service time) into busy workers per minute.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError, NotFoundError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.settings import DEFAULT_LOAD_SCALE

FloatArray = NDArray[np.float64]

DEFAULT_TRACE_NAME = "genai-requests-2024-11.csv"
# DEFAULT_LOAD_SCALE (in settings): the real trace is a sample (about 0.4 busy workers on
# average); scaled x20 its peaks need tens of replicas, the size of service the hybrid policy is
# meant for. Shape is unchanged.
DEFAULT_SMOOTHING_MINUTES = 5
"""Requests may queue a few minutes (image generation is not interactive to the second), so
demand is the mean busy workers over this window rather than the single-minute spike."""


@dataclass(frozen=True)
class ServiceDemand:
    name: str
    demand: FloatArray = field(compare=False, repr=False)


@dataclass(frozen=True)
class DemandTrace:
    name: str
    start: dt.datetime
    services: tuple[ServiceDemand, ...]

    def __post_init__(self) -> None:
        if not self.services:
            raise ConfigError(f"trace {self.name} has no services")
        sizes = {s.demand.size for s in self.services}
        if len(sizes) != 1 or next(iter(sizes)) % MINUTES_PER_DAY:
            raise ConfigError(
                f"trace {self.name}: every service needs the same number of whole days of minutes"
            )

    @property
    def minutes(self) -> int:
        return self.services[0].demand.size

    @property
    def days(self) -> int:
        return self.minutes // MINUTES_PER_DAY

    def weekday(self, minute: int) -> int:
        return (self.start + dt.timedelta(minutes=minute)).weekday()


def default_trace_path() -> Path:
    """``$TIDAL_TRACES_DIR/genai-requests-2024-11.csv``, else the same file in
    ``<repo>/../shared/traces`` (the repo holding ``src/tidal``)."""
    env = os.environ.get("TIDAL_TRACES_DIR")
    if env:
        return Path(env) / DEFAULT_TRACE_NAME
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "traces" / DEFAULT_TRACE_NAME


def synthetic(
    *,
    seed: int = 7,
    days: int = 14,
    services: int = 6,
    peak_replicas: tuple[float, float] = (40.0, 160.0),
    offpeak_fraction: tuple[float, float] = (0.12, 0.2),
    peak_hours: float = 4.0,
    noise: float = 0.03,
    bursts_per_week: float = 2.0,
) -> DemandTrace:
    """A seeded tide: same seed, same trace.

    Each service peaks once a day for about ``peak_hours`` (centred in the evening, with
    45-minute ramps), sits at ``offpeak_fraction`` of its peak otherwise, is up to 10 % quieter
    at the weekend (a smooth weekly wave), carries AR(1) multiplicative noise, and now and then a +20-40 % burst that builds
    over ten minutes.
    """
    if days < 1 or services < 1:
        raise ConfigError("synthetic trace needs at least one day and one service")
    rng = np.random.default_rng(seed)
    minutes = days * MINUTES_PER_DAY
    start = dt.datetime(2024, 11, 4)  # a Monday
    t = np.arange(minutes)
    mod = t % MINUTES_PER_DAY
    week_pos = (t / MINUTES_PER_DAY + start.weekday()) / 7.0
    weekly = 1.0 - 0.05 * (1 - np.cos(2 * np.pi * (week_pos - 2.5 / 7)))  # Wed high, Sun low
    out = []
    for i in range(services):
        peak = rng.uniform(*peak_replicas)
        base = rng.uniform(*offpeak_fraction)
        centre = rng.uniform(18.5, 21.5) * 60
        ramp = 45.0
        half = peak_hours * 60 / 2
        dist = np.abs(((mod - centre + 720) % MINUTES_PER_DAY) - 720)
        shape = np.clip((half + ramp / 2 - dist) / ramp, 0.0, 1.0)
        shape = 0.5 - 0.5 * np.cos(np.pi * shape)  # smooth ramps
        level = base + (1 - base) * shape
        level = level * weekly
        ar = np.empty(minutes)
        ar[0] = 0.0
        eps = rng.normal(0.0, noise * 0.3, minutes)
        for k in range(1, minutes):
            ar[k] = 0.95 * ar[k - 1] + eps[k]
        level = level * (1 + np.clip(ar, -3 * noise, 3 * noise))
        n_bursts = rng.poisson(bursts_per_week * days / 7)
        for _ in range(n_bursts):
            b0 = int(rng.integers(0, minutes - 90))
            length = int(rng.integers(20, 60))
            height = rng.uniform(0.2, 0.4)
            env = np.concatenate([np.linspace(0, 1, 10), np.ones(length), np.linspace(1, 0, 10)])[
                : minutes - b0
            ]
            level[b0 : b0 + env.size] *= 1 + height * env
        out.append(ServiceDemand(f"svc-{i:02d}", peak * level))
    return DemandTrace(f"synthetic(seed={seed},days={days},services={services})", start, tuple(out))


def load_request_trace(
    path: Path,
    *,
    load_scale: float = DEFAULT_LOAD_SCALE,
    replica_concurrency: float = 1.0,
    smoothing_minutes: int = DEFAULT_SMOOTHING_MINUTES,
    split_by: str | None = "predict_type",
) -> DemandTrace:
    """Busy workers per minute from a request-level CSV (``gmt_create``, ``exec_time_seconds``).

    A request occupies one worker from its creation for its service time; busy seconds are
    spread over the minutes they cover. Replica demand = busy workers x ``load_scale`` /
    ``replica_concurrency``, averaged over ``smoothing_minutes``. ``split_by`` names a column
    whose values become separate services (None: one service).
    """
    if not path.exists():
        raise NotFoundError(
            f"trace file {path} does not exist; pass --trace synthetic or the path of a "
            "request-level CSV (gmt_create, exec_time_seconds)"
        )
    rows: list[tuple[dt.datetime, float, str]] = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"gmt_create", "exec_time_seconds"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ConfigError(
                f"trace {path}: needs columns {sorted(need)}, has {reader.fieldnames}"
            )
        for lineno, row in enumerate(reader, start=2):
            raw = row["exec_time_seconds"]
            if not raw:
                continue
            try:
                when = dt.datetime.fromisoformat(row["gmt_create"])
                exec_s = float(raw)
            except ValueError as exc:
                raise ConfigError(f"trace {path} line {lineno}: {exc}") from exc
            key = (row.get(split_by) or "other") if split_by else "all"
            rows.append((when, exec_s, key))
    if not rows:
        raise ConfigError(f"trace {path} has no requests with a service time")
    start = min(r[0] for r in rows).replace(hour=0, minute=0, second=0, microsecond=0)
    end = max(r[0] + dt.timedelta(seconds=r[1]) for r in rows)
    days = math.ceil((end - start).total_seconds() / 86400)
    minutes = days * MINUTES_PER_DAY
    busy: dict[str, FloatArray] = defaultdict(lambda: np.zeros(minutes))
    for when, exec_s, key in rows:
        s = (when - start).total_seconds()
        e = min(s + exec_s, minutes * 60.0)
        series = busy[key]
        m = int(s // 60)
        while s < e and m < minutes:
            chunk = min(e, (m + 1) * 60.0) - s
            series[m] += chunk / 60.0
            s += chunk
            m += 1
    services = []
    for key in sorted(busy):
        demand = busy[key] * load_scale / replica_concurrency
        if smoothing_minutes > 1:
            kernel = np.ones(smoothing_minutes) / smoothing_minutes
            demand = np.convolve(demand, kernel)[:minutes]  # trailing mean: causal
        services.append(ServiceDemand(key.lower(), demand))
    return DemandTrace(path.name, start, tuple(services))
