"""Per-minute replica demand for many services: seeded scenarios and the inputs users have.

A :class:`DemandTrace` is whole days of minutes starting at midnight, one demand series per
service, in replica-equivalents (the load that one replica carries at 100 %), each service with
the requests of one replica (CPU, memory, GPUs). Demand is **raw**: per-minute, never smoothed
here (the simulator counts the SLO on it; smoothing is only ever an input to decisions).

Inputs (each returns a trace whose ``warnings`` name what was padded, gapped or short):

- :func:`load_request_trace`: a request log (request time, service time, optional service
  column; column names configurable): busy workers per minute.
- :func:`load_pod_events`: a list of pods with create/delete times and CPU/memory/GPU requests
  (a cluster's own export): live pods per minute, one service per shape or per named column.
- :func:`load_replica_series`: per-minute replica or usage series, CSV (wide: a time column and
  one column per service; or long: time, service, value) or Prometheus range-query JSON.

Scenarios: :func:`synthetic` (the tide), :func:`step_scenario` (the write-up's: off-peak 70 %
of peak, a 4-hour daily peak) and :func:`pod_event_sample` (a seeded pod list to test with).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError, NotFoundError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.model import Resources
from tidal.sched.settings import DEFAULT_LOAD_SCALE

FloatArray = NDArray[np.float64]

DEFAULT_TRACE_NAME = "genai-requests-2024-11.csv"
# DEFAULT_LOAD_SCALE (in settings): the real trace is a sample (about 0.4 busy workers on
# average); scaled x20 its peaks need tens of replicas, the size of service the hybrid policy is
# meant for. Shape is unchanged.
REFERENCE_REPLICA = Resources(2000, 4096)
"""A replica of a trace that does not say (request logs, replica series): 2 CPUs, 4 GiB."""
GAP_WARN_MINUTES = 1440
"""A log in which nothing starts for a whole day is probably missing data: say so (quiet
nights and mornings are normal)."""
SERIES_GAP_MINUTES = 5
"""A replica series missing samples for longer than this is filled forward with a warning."""
PAD_WARN_MINUTES = 60
"""Padding the last day with more than this many empty minutes is worth a warning."""


@dataclass(frozen=True)
class ServiceDemand:
    name: str
    demand: FloatArray = field(compare=False, repr=False)
    requests: Resources = REFERENCE_REPLICA
    """What one replica of this service requests (its size on owned nodes and its price)."""


@dataclass(frozen=True)
class DemandTrace:
    name: str
    start: dt.datetime
    services: tuple[ServiceDemand, ...]
    warnings: tuple[str, ...] = ()
    """What the loader had to assume (padding, gaps, a short trace): shown to the user."""

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

    def days_between(self, first: int, end: int, name: str | None = None) -> DemandTrace:
        """Days ``first`` to ``end`` (exclusive) as a trace of their own."""
        if not 0 <= first < end <= self.days:
            raise ConfigError(f"trace {self.name} has {self.days} days; cannot take {first}-{end}")
        a, b = first * MINUTES_PER_DAY, end * MINUTES_PER_DAY
        return DemandTrace(
            name or f"{self.name}[days {first}-{end - 1}]",
            self.start + dt.timedelta(days=first),
            tuple(replace(s, demand=s.demand[a:b]) for s in self.services),
            self.warnings,
        )

    def split(self, train_days: int) -> tuple[DemandTrace, DemandTrace]:
        """The first ``train_days`` days (history, fitted on) and the rest (evaluated)."""
        if not 0 < train_days < self.days:
            raise ConfigError(
                f"trace {self.name} has {self.days} days; it cannot be split after {train_days} "
                "(the evaluated part would be empty or there would be no history); pass a "
                "longer trace, fewer train days, or --train FILE --eval FILE"
            )
        return (
            self.days_between(0, train_days, f"{self.name} (train)"),
            self.days_between(train_days, self.days, f"{self.name} (eval)"),
        )

    def with_warning(self, text: str) -> DemandTrace:
        return replace(self, warnings=(*self.warnings, text))


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


def step_scenario(
    *,
    seed: int = 1,
    days: int = 14,
    services: int = 4,
    peak_replicas: tuple[float, float] = (40.0, 160.0),
    offpeak_fraction: float = 0.7,
    peak_hours: float = 4.0,
    noise: float = 0.0,
) -> DemandTrace:
    """The write-up's scenario: off-peak at ``offpeak_fraction`` of the peak, a daily peak of
    ``peak_hours`` that starts with a step at the same minute every day (per service, between
    17:00 and 20:00), optional AR(1) noise of ``noise`` (0: exact, as in the write-up's sums)."""
    if days < 1 or services < 1 or not 0 < offpeak_fraction <= 1:
        raise ConfigError("step scenario needs days >= 1, services >= 1, off-peak in (0, 1]")
    rng = np.random.default_rng(seed)
    minutes = days * MINUTES_PER_DAY
    mod = np.arange(minutes) % MINUTES_PER_DAY
    out = []
    for i in range(services):
        peak = rng.uniform(*peak_replicas)
        begin = int(rng.integers(17 * 60, 20 * 60))
        level = np.where((mod >= begin) & (mod < begin + peak_hours * 60), 1.0, offpeak_fraction)
        if noise > 0:
            ar = np.zeros(minutes)
            eps = rng.normal(0.0, noise * 0.3, minutes)
            for k in range(1, minutes):
                ar[k] = 0.95 * ar[k - 1] + eps[k]
            level = level * (1 + np.clip(ar, -3 * noise, 3 * noise))
        out.append(ServiceDemand(f"step-{i:02d}", peak * level))
    name = f"step(seed={seed},days={days},services={services},noise={noise:g})"
    return DemandTrace(name, dt.datetime(2024, 11, 4), tuple(out))


# --- turning timed intervals into per-minute occupancy ---------------------------------------


def _occupancy(starts_s: FloatArray, ends_s: FloatArray, minutes: int) -> FloatArray:
    """Sum over intervals of the share of each minute they cover (busy workers per minute).

    Vectorised: the covered seconds before time T are ``sum(clip(T - s, 0, e - s))``, which
    sorted starts and ends with prefix sums give for every minute boundary at once.
    """
    s = np.sort(np.asarray(starts_s, dtype=np.float64))
    e = np.sort(np.asarray(ends_s, dtype=np.float64))
    grid = np.arange(minutes + 1, dtype=np.float64) * 60.0
    cs = np.concatenate([[0.0], np.cumsum(s)])
    ce = np.concatenate([[0.0], np.cumsum(e)])
    ks = np.searchsorted(s, grid, side="left")
    ke = np.searchsorted(e, grid, side="left")
    covered = (ks * grid - cs[ks]) - (ke * grid - ce[ke])
    out: FloatArray = np.diff(covered) / 60.0
    return np.maximum(out, 0.0)


def _parse_time(text: str, where: str) -> dt.datetime:
    """ISO 8601 (``2024-11-15 16:57:50``, ``...Z``) or Unix seconds; naive times are UTC."""
    t = text.strip()
    try:
        when = dt.datetime.fromtimestamp(float(t), dt.UTC)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"{where}: {text!r} is not a time (ISO 8601 or Unix seconds)"
            ) from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


@dataclass(frozen=True)
class _Intervals:
    """Timed occupancy per service key, before binning into minutes."""

    starts: dict[str, list[dt.datetime]]
    ends: dict[str, list[dt.datetime | None]]
    requests: dict[str, Resources]


def _bin_days(
    name: str,
    intervals: _Intervals,
    scale: float,
    *,
    data_end: dt.datetime | None = None,
) -> DemandTrace:
    """Whole days from the midnight before the first start; open intervals run to the end."""
    firsts = [min(v) for v in intervals.starts.values() if v]
    if not firsts:
        raise ConfigError(f"trace {name} holds nothing to count")
    origin = min(firsts).replace(hour=0, minute=0, second=0, microsecond=0)
    closed = [e for v in intervals.ends.values() for e in v if e is not None]
    last = max([*closed, *(max(v) for v in intervals.starts.values() if v)])
    if data_end is not None:
        last = max(last, data_end)
    span_s = (last - origin).total_seconds()
    days = max(1, math.ceil(span_s / 86400 + 1e-9))
    minutes = days * MINUTES_PER_DAY
    horizon = origin + dt.timedelta(days=days)
    warnings = []
    padded = int((horizon - last).total_seconds() // 60)
    if padded > PAD_WARN_MINUTES:
        warnings.append(
            f"trace {name}: the data end at {last:%Y-%m-%d %H:%M}; the last {padded} minutes of "
            "that day are padded with zero demand"
        )
    services = []
    all_starts = []
    for key in sorted(intervals.starts):
        st = intervals.starts[key]
        en = [horizon if e is None else e for e in intervals.ends[key]]
        s_arr = np.array([(x - origin).total_seconds() for x in st])
        e_arr = np.array([(x - origin).total_seconds() for x in en])
        all_starts.append(s_arr)
        demand = _occupancy(s_arr, np.maximum(e_arr, s_arr), minutes) * scale
        services.append(ServiceDemand(key, demand, intervals.requests[key]))
    starts = np.sort(np.concatenate(all_starts))
    gaps = np.diff(starts) / 60.0
    for i in np.nonzero(gaps > GAP_WARN_MINUTES)[0][:5]:
        a = origin + dt.timedelta(seconds=float(starts[i]))
        warnings.append(
            f"trace {name}: nothing starts between {a:%Y-%m-%d %H:%M} and "
            f"{a + dt.timedelta(minutes=float(gaps[i])):%Y-%m-%d %H:%M} "
            f"({gaps[i] / 60:.1f} h): is the export complete? counted as zero demand"
        )
    return DemandTrace(name, origin, tuple(services), tuple(warnings))


def _reader(path: Path, what: str, need: Iterable[str]) -> tuple[csv.DictReader[str], Any]:
    if not path.exists():
        raise NotFoundError(f"{what} {path} does not exist")
    fh = path.open(newline="")
    reader = csv.DictReader(fh)
    missing = [c for c in need if reader.fieldnames is None or c not in reader.fieldnames]
    if missing:
        fh.close()
        raise ConfigError(
            f"{what} {path}: no column {', '.join(map(repr, missing))}; it has "
            f"{reader.fieldnames}; name the columns with the loader's column options"
        )
    return reader, fh


def load_request_trace(
    path: Path,
    *,
    load_scale: float = DEFAULT_LOAD_SCALE,
    replica_concurrency: float = 1.0,
    time_column: str = "gmt_create",
    duration_column: str = "exec_time_seconds",
    split_by: str | None = "predict_type",
    requests: Resources = REFERENCE_REPLICA,
) -> DemandTrace:
    """Busy workers per minute from a request log (request time + service time per row).

    A request occupies one worker from its time for its service time; busy seconds are spread
    over the minutes they cover. Replica demand = busy workers x ``load_scale`` /
    ``replica_concurrency``, raw per minute. ``split_by`` names a column whose values become
    separate services (None: one service). Rows without a service time are skipped.
    """
    if not path.exists():
        raise NotFoundError(
            f"trace file {path} does not exist; pass --trace synthetic or the path of a "
            f"request-level CSV ({time_column}, {duration_column})"
        )
    if load_scale <= 0 or replica_concurrency <= 0:
        raise ConfigError("load scale and replica concurrency must be positive")
    need = [time_column, duration_column] + ([split_by] if split_by else [])
    reader, fh = _reader(path, "request log", need[:2])
    starts: dict[str, list[dt.datetime]] = {}
    ends: dict[str, list[dt.datetime | None]] = {}
    with fh:
        for lineno, row in enumerate(reader, start=2):
            raw = row[duration_column]
            if not raw:
                continue
            when = _parse_time(row[time_column], f"request log {path} line {lineno}")
            try:
                exec_s = float(raw)
            except ValueError:
                raise ConfigError(
                    f"request log {path} line {lineno}: {duration_column}={raw!r} is not seconds"
                ) from None
            key = ((row.get(split_by) or "other") if split_by else "all").lower()
            starts.setdefault(key, []).append(when)
            ends.setdefault(key, []).append(when + dt.timedelta(seconds=max(exec_s, 0.0)))
    if not starts:
        raise ConfigError(f"trace {path} has no requests with a service time")
    iv = _Intervals(starts, ends, {k: requests for k in starts})
    return _bin_days(path.name, iv, load_scale / replica_concurrency)


POD_EVENT_COLUMNS = {
    "create": "create_time",
    "delete": "delete_time",
    "cpu": "cpu",
    "memory": "memory",
    "gpu": "gpu",
    "service": "service",
}
"""Default column names of a pod event list; any can be renamed (``columns=``)."""


def load_pod_events(
    path: Path,
    *,
    columns: Mapping[str, str] | None = None,
    end: dt.datetime | None = None,
) -> DemandTrace:
    """Live pods per minute from a pod list with create/delete times and requests.

    Columns (renamable): ``create_time``, ``delete_time`` (empty: still running at the end of
    the export), ``cpu`` and ``memory`` (Kubernetes quantities: ``500m``, ``2``, ``4Gi``), ``gpu``
    (optional, a count) and ``service`` (optional). Without a service column, pods are grouped
    by their shape (``2c4g``, ``4c16g1gpu``): pods of one shape are interchangeable replicas for
    the scheduler. Pods of one service with different shapes are split by shape
    (``web/2c4g``). ``end``: when the export was taken (default: the last event).
    """
    from tidal.sched.quantity import parse_quantity

    cols = {**POD_EVENT_COLUMNS, **(columns or {})}
    reader, fh = _reader(path, "pod event list", [cols["create"], cols["cpu"], cols["memory"]])
    starts: dict[str, list[dt.datetime]] = {}
    ends: dict[str, list[dt.datetime | None]] = {}
    shapes: dict[str, Resources] = {}
    with fh:
        fields = reader.fieldnames or []
        has_service = cols["service"] in fields
        has_gpu = cols["gpu"] in fields
        has_delete = cols["delete"] in fields
        for lineno, row in enumerate(reader, start=2):
            where = f"pod event list {path} line {lineno}"
            created = _parse_time(row[cols["create"]], where)
            gone_text = (row.get(cols["delete"]) or "").strip() if has_delete else ""
            gone = _parse_time(gone_text, where) if gone_text else None
            if gone is not None and gone < created:
                raise ConfigError(f"{where}: deleted ({gone}) before it was created ({created})")
            try:
                req = Resources(
                    round(parse_quantity(row[cols["cpu"]] or "0") * 1000),
                    round(parse_quantity(row[cols["memory"]] or "0") / 2**20),
                    round(parse_quantity((row.get(cols["gpu"]) or "0") if has_gpu else "0")),
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if req.cpu_milli == 0 and req.memory_mib == 0 and req.gpu == 0:
                raise ConfigError(
                    f"{where}: the pod requests nothing; the scheduler cannot size it"
                )
            shape = str(req)
            key = f"{row[cols['service']]}/{shape}" if has_service else shape
            starts.setdefault(key, []).append(created)
            ends.setdefault(key, []).append(gone)
            shapes[key] = req
    if not starts:
        raise ConfigError(f"pod event list {path} holds no pods")
    if has_service:  # one shape per service: drop the shape suffix
        by_service: dict[str, list[str]] = {}
        for key in starts:
            by_service.setdefault(key.rsplit("/", 1)[0], []).append(key)
        rename = {ks[0]: svc for svc, ks in by_service.items() if len(ks) == 1}
        starts = {rename.get(k, k): v for k, v in starts.items()}
        ends = {rename.get(k, k): v for k, v in ends.items()}
        shapes = {rename.get(k, k): v for k, v in shapes.items()}
    return _bin_days(path.name, _Intervals(starts, ends, shapes), 1.0, data_end=end)


def _series_trace(
    name: str,
    samples: Mapping[str, Sequence[tuple[dt.datetime, float]]],
    requests: Resources,
    scale: float,
) -> DemandTrace:
    """Per-minute values from timed samples: each sample holds until the next (fill-forward),
    gaps longer than :data:`SERIES_GAP_MINUTES` are filled too, with a warning."""
    firsts = [min(t for t, _ in v) for v in samples.values() if v]
    if not firsts:
        raise ConfigError(f"series {name} holds no samples")
    origin = min(firsts).replace(hour=0, minute=0, second=0, microsecond=0)
    last = max(max(t for t, _ in v) for v in samples.values() if v)
    days = max(1, math.ceil(((last - origin).total_seconds() + 60) / 86400 - 1e-9))
    minutes = days * MINUTES_PER_DAY
    warnings = []
    services = []
    for key in sorted(samples):
        pts = sorted(samples[key])
        idx = np.array([int((t - origin).total_seconds() // 60) for t, _ in pts])
        val = np.array([v for _, v in pts], dtype=np.float64)
        if np.any(val < 0) or not np.all(np.isfinite(val)):
            raise ConfigError(f"series {name}, {key}: values must be finite and >= 0")
        out = np.zeros(minutes)
        # fill-forward: minute m takes the last sample at or before it
        pos = np.searchsorted(idx, np.arange(minutes), side="right") - 1
        have = pos >= 0
        out[have] = val[pos[have]]
        gaps = np.diff(idx)
        for i in np.nonzero(gaps > SERIES_GAP_MINUTES)[0][:5]:
            a = origin + dt.timedelta(minutes=int(idx[i]))
            warnings.append(
                f"series {name}, {key}: no sample for {int(gaps[i])} minutes after "
                f"{a:%Y-%m-%d %H:%M}; the last value was carried forward"
            )
        if idx[0] > SERIES_GAP_MINUTES:
            warnings.append(
                f"series {name}, {key}: starts {int(idx[0])} minutes after midnight; the minutes "
                "before are zero"
            )
        tail = minutes - 1 - int(idx[-1])
        if tail > PAD_WARN_MINUTES:
            warnings.append(
                f"series {name}, {key}: ends {tail} minutes before the end of its last day; the "
                "last value is carried to midnight"
            )
        services.append(ServiceDemand(key, out * scale, requests))
    return DemandTrace(name, origin, tuple(services), tuple(warnings))


def load_replica_series(
    path: Path,
    *,
    time_column: str = "time",
    service_column: str = "service",
    value_column: str = "value",
    label: str | None = None,
    scale: float = 1.0,
    requests: Resources = REFERENCE_REPLICA,
) -> DemandTrace:
    """Per-minute replica (or usage, in replica-equivalents x ``scale``) series.

    - ``.json``: a Prometheus range query answer (``/api/v1/query_range``: ``resultType``
      ``matrix``); each series is a service named by its ``label`` (default: the first of
      ``service``, ``deployment``, ``app``, ``job``, ``pod`` present, else all labels).
    - CSV, long: ``time``, ``service``, ``value`` columns (renamable).
    - CSV, wide: a ``time`` column and one column per service.
    """
    if not path.exists():
        raise NotFoundError(f"replica series {path} does not exist")
    samples: dict[str, list[tuple[dt.datetime, float]]] = {}
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
            result = doc["data"]["result"]
            if doc["data"].get("resultType") != "matrix":
                raise ValueError(f"resultType {doc['data'].get('resultType')!r}, not 'matrix'")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"replica series {path}: not a Prometheus range-query answer ({exc}); save the "
                "JSON of /api/v1/query_range"
            ) from None
        for i, series in enumerate(result):
            metric = series.get("metric") or {}
            key = _series_name(metric, label, i)
            pts = samples.setdefault(key, [])
            for ts, value in series.get("values") or []:
                pts.append((_parse_time(str(ts), f"{path} series {key}"), float(value)))
        return _series_trace(path.name, samples, requests, scale)
    reader, fh = _reader(path, "replica series", [time_column])
    with fh:
        fields = reader.fieldnames or []
        long = service_column in fields and value_column in fields
        columns = [c for c in fields if c != time_column]
        if not long and not columns:
            raise ConfigError(f"replica series {path}: no value columns besides {time_column!r}")
        for lineno, row in enumerate(reader, start=2):
            where = f"replica series {path} line {lineno}"
            when = _parse_time(row[time_column], where)
            items = [(row[service_column], row[value_column])] if long else row.items()
            for key, text in items:
                if key == time_column or text is None or text == "":
                    continue
                try:
                    v = float(text)
                except ValueError:
                    raise ConfigError(f"{where}: {key}={text!r} is not a number") from None
                samples.setdefault(str(key), []).append((when, v))
    return _series_trace(path.name, samples, requests, scale)


def _series_name(metric: Mapping[str, str], label: str | None, index: int) -> str:
    if label is not None:
        if label not in metric:
            raise ConfigError(f"series {index} has no label {label!r}; it has {sorted(metric)}")
        return str(metric[label])
    for key in ("service", "deployment", "app", "job", "pod"):
        if key in metric:
            return str(metric[key])
    return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or f"series-{index}"


def pod_event_sample(
    *, seed: int = 1, days: int = 9, start: dt.datetime = dt.datetime(2024, 11, 4)
) -> list[dict[str, str]]:
    """A seeded pod list shaped like a production cluster's export, to test with.

    Three workloads: ``web`` (2 CPU / 4 Gi pods following a daily tide, 20 -> 90 replicas,
    evening peak, scaled one pod at a time as an HPA would, scale-in newest first), ``api``
    (1 CPU / 2 Gi, a flatter tide, 10 -> 30) and ``render`` (GPU batch: 4 CPU / 16 Gi / 1 GPU
    pods in bursts of 2-12 arriving as a Poisson process, busier in the evening, each living a
    lognormal 10-60 minutes). Times are ISO 8601; the last day's running pods have no delete
    time (still running when exported).
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    minutes = days * MINUTES_PER_DAY
    t = np.arange(minutes)
    mod = t % MINUTES_PER_DAY

    def stamp(minute: float) -> str:
        return (start + dt.timedelta(minutes=float(minute))).isoformat(sep=" ")

    def tide(low: float, high: float, centre_h: float, width_h: float) -> FloatArray:
        dist = np.abs(((mod - centre_h * 60 + 720) % MINUTES_PER_DAY) - 720)
        shape = np.clip((width_h * 60 / 2 + 30 - dist) / 60, 0, 1)
        noise = 1 + rng.normal(0, 0.02, minutes)
        out: FloatArray = (low + (high - low) * (0.5 - 0.5 * np.cos(np.pi * shape))) * noise
        return out

    for name, cpu, mem, series in (
        ("web", "2", "4Gi", tide(20, 90, 20.0, 4.0)),
        ("api", "1", "2Gi", tide(10, 30, 14.0, 8.0)),
    ):
        live: list[float] = []  # creation minutes of running pods, oldest first
        want = np.ceil(series).astype(int)
        for m in range(minutes):
            while len(live) < want[m]:
                live.append(m + float(rng.uniform(0, 1)))
            while len(live) > want[m]:
                created = live.pop()  # the newest goes first
                rows.append(_pod_row(name, cpu, mem, "0", stamp(created), stamp(m + 0.5)))
        for created in live:
            rows.append(_pod_row(name, cpu, mem, "0", stamp(created), ""))
    rate = 0.04 + 0.16 * (np.abs(((mod - 21 * 60 + 720) % MINUTES_PER_DAY) - 720) < 180)
    for m in np.nonzero(rng.random(minutes) < rate / 10)[0].tolist():
        for _ in range(int(rng.integers(2, 13))):
            created = float(m) + float(rng.uniform(0, 2))
            life = float(np.clip(rng.lognormal(math.log(25), 0.5), 10, 60))
            end = created + life
            rows.append(
                _pod_row(
                    "render", "4", "16Gi", "1", stamp(created), stamp(end) if end < minutes else ""
                )
            )
    rows.sort(key=lambda r: r["create_time"])
    return rows


def _pod_row(svc: str, cpu: str, mem: str, gpu: str, created: str, deleted: str) -> dict[str, str]:
    return {
        "create_time": created,
        "delete_time": deleted,
        "service": svc,
        "cpu": cpu,
        "memory": mem,
        "gpu": gpu,
    }


def write_pod_events(rows: Sequence[Mapping[str, str]], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(
            fh,
            fieldnames=["create_time", "delete_time", "service", "cpu", "memory", "gpu"],
        )
        w.writeheader()
        w.writerows(rows)
    return path
