"""Trace-driven simulator: four placement policies over the same demand, compared in one run.

Minutes are the clock. A decision taken at minute ``t`` sees demand up to and including
minute ``t`` (the load as the minute starts). Owned slots (sized per policy) are paid every
minute. A virtual pod is paid from the minute it is requested until it is deleted, but serves
only ``lead`` minutes later (``lead = ceil(creation_latency_s / 60)``): the creation latency is
both a delay and a cost, for every policy. Deleting a pod takes effect at once. Policies:

- ``all-owned``: owned capacity sized for the evaluated peak (in hindsight, so the cheapest
  all-owned fleet that meets the SLO); nothing virtual.
- ``naive-overflow``: owned sized at 70 % of that peak; a virtual pod is requested only once a
  replica is pending on full owned nodes (one minute to notice, then the creation latency), and
  the HPA has no headroom.
- ``tidal``: owned sized at the threshold the predictor fitted on the training days (never on
  the days evaluated); every evaluated day re-fits on the days before it; the replica target is
  the higher of cron rules (the forecast floor) and an HPA that extrapolates the load it sees by
  the growth the forecast expects within the creation latency, plus the margin learned on
  held-out history days; replicas above the threshold go straight to virtual pools.
- ``oracle``: knows the evaluated days and plays by the same rules: hindsight-optimal owned
  size, each virtual pod requested exactly ``lead`` minutes before it is needed (and paid from
  then). The lowest cost any policy can reach under this model.

:func:`simulate` also reports bounds that are not policies: ``oracle-instant`` (virtual pods
that exist the minute they are needed, with no creation latency: unreachable, the old
definition of the oracle, kept to show what the latency costs) and, on request,
``tidal-hindsight`` (Tidal's own reactive policy with the margin set in hindsight to the least
that meets the SLO on the evaluated days): between it and ``oracle`` lies what any policy that
does not know the future must pay; between ``tidal`` and it, what learning the margin from
history costs.

Virtual pods of all services draw on the pools in declared order; when the requested spec is
sold out they are upgraded to the next spec (at its price), and when a site is out they go to
the next site's pool, after a creation latency during which the lost pods count as missing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from tidal.errors import ConfigError
from tidal.ids import NodeName
from tidal.sched.autoscale import MINUTES_PER_DAY, cron_rules_from_profile
from tidal.sched.cost import owned_cost, slo_violation_minutes, virtual_cost
from tidal.sched.model import Resources, VirtualPool, VirtualSpec
from tidal.sched.predictor import (
    BacktestReport,
    Forecast,
    Margin,
    ThresholdPredictor,
    fit_margin,
    optimal_threshold,
)
from tidal.sched.settings import POLICIES
from tidal.sched.traces import DemandTrace

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

BOUNDS = ("oracle-instant", "tidal-hindsight")
"""Reported beside the policies, never as one: see the module docstring."""
WRITEUP_PRICE_RATIO = 1.5


def default_pools(
    price_ratio: float = WRITEUP_PRICE_RATIO, base_stock: int | None = None
) -> tuple[VirtualPool, ...]:
    """Two sites selling 2c4g -> 4c8g -> 8c16g at ``price_ratio`` per 2c4g-equivalent."""
    specs = (
        VirtualSpec.of("2c4g", price_ratio),
        VirtualSpec.of("4c8g", 2 * price_ratio),
        VirtualSpec.of("8c16g", 4 * price_ratio),
    )
    stock = {} if base_stock is None else {"2c4g": base_stock}
    return (
        VirtualPool("vk-cloud-a", NodeName("virtual-kubelet-cloud-a"), "cloud-a", specs, stock),
        VirtualPool("vk-cloud-b", NodeName("virtual-kubelet-cloud-b"), "cloud-b", specs, stock),
    )


@dataclass(frozen=True)
class SiteOutage:
    site: str
    start_minute: int
    """Minute from the start of the trace."""
    end_minute: int


@dataclass(frozen=True)
class SimConfig:
    price_ratio: float = WRITEUP_PRICE_RATIO
    creation_latency_s: float = 60.0
    ceiling: float = 0.6
    train_days: int = 7
    naive_owned_fraction: float = 0.7
    naive_stabilisation_min: int = 5
    """The stock HPA's scale-down stabilisation window (300 s), which the naive policy keeps."""
    tidal_stabilisation_min: int = 1
    """Tidal sets the HPA's ``behavior.scaleDown`` window short: virtual pods bill per use."""
    replica_requests: Resources = field(default_factory=lambda: Resources(2000, 4096))
    pools: tuple[VirtualPool, ...] = field(default_factory=default_pools)
    site_outages: tuple[SiteOutage, ...] = ()
    predictor_window_days: int = 7
    margin_return_period_days: float = 365.0
    """Tidal's margin is sized for a day needing more once in this many days per service."""

    @property
    def lead_minutes(self) -> int:
        return max(1, math.ceil(self.creation_latency_s / 60.0))


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    cost: float
    owned_cost: float
    virtual_cost: float
    saving_vs_all_owned: float
    slo_violation_minutes: int
    owned_utilisation_peak: float
    owned_utilisation_mean: float
    virtual_pod_hours: float
    spec_upgrades: int
    owned_slots: int

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "cost": round(self.cost, 3),
            "saving_vs_all_owned": round(self.saving_vs_all_owned, 5),
            "slo_violation_minutes": self.slo_violation_minutes,
            "owned_utilisation_peak": round(self.owned_utilisation_peak, 4),
            "owned_utilisation_mean": round(self.owned_utilisation_mean, 4),
            "virtual_pod_hours": round(self.virtual_pod_hours, 2),
            "spec_upgrades": self.spec_upgrades,
            "owned_cost": round(self.owned_cost, 3),
            "virtual_cost": round(self.virtual_cost, 3),
            "owned_slots": self.owned_slots,
        }


@dataclass(frozen=True)
class PolicySeries:
    """Per-minute totals over services, for plots."""

    owned_slots: int
    ready_capacity: IntArray = field(repr=False)
    virtual_live: IntArray = field(repr=False)


@dataclass(frozen=True)
class SimulationReport:
    trace: str
    train_days: int
    evaluated_days: int
    policies: dict[str, PolicyResult]
    bounds: dict[str, PolicyResult]
    """``oracle-instant`` and ``tidal-hindsight`` when computed: references, not policies."""
    backtests: dict[str, BacktestReport]
    thresholds: dict[str, int]
    margins: dict[str, Margin]
    """Tidal's margin per service as learned for the first evaluated day."""
    demand: FloatArray = field(repr=False)
    series: dict[str, PolicySeries] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "trace": self.trace,
            "train_days": self.train_days,
            "evaluated_days": self.evaluated_days,
            "policies": {name: r.to_json() for name, r in self.policies.items()},
            "bounds": {name: r.to_json() for name, r in self.bounds.items()},
            "thresholds": self.thresholds,
            "margins": {
                svc: {
                    "load_fraction": round(m.load_fraction, 4),
                    "peak_fraction": round(m.peak_fraction, 4),
                    "scale_replicas": round(m.scale_replicas, 2),
                    "safety": round(m.safety, 3),
                    "heldout_days": m.heldout_days,
                }
                for svc, m in self.margins.items()
            },
            "backtest": {
                svc: {
                    "days": b.days,
                    "peak_mape": round(b.peak_mape, 4),
                    "peak_bias": round(b.peak_bias, 4),
                    "underforecast_minutes": round(b.underforecast_minutes, 4),
                    "threshold_regret": round(b.threshold_regret, 4),
                    "short_days": round(b.short_days, 4),
                }
                for svc, b in self.backtests.items()
            },
        }


def run_virtual(desired: IntArray, lead: int, stabilisation: int) -> tuple[IntArray, IntArray]:
    """Live (billed) and ready virtual pods per minute for a desired-count series.

    ``desired[t]`` is decided as minute ``t`` starts; pods requested then are billed from
    minute ``t`` and ready from minute ``t + lead``. Scale-down keeps the highest desire of the
    last ``stabilisation`` minutes (HPA semantics), removes not-yet-ready pods first (newest
    first) and takes effect at once.
    """
    n = desired.size
    live_out = np.zeros(n, dtype=np.int64)
    ready_out = np.zeros(n, dtype=np.int64)
    pipeline: deque[list[int]] = deque()  # [ready_minute, count], oldest first
    # warm start: the minute before the run already had what it wanted
    live = ready = int(desired[0]) if n else 0
    window: deque[tuple[int, int]] = deque()  # monotonic max of recent desires
    for t in range(n):
        while pipeline and pipeline[0][0] <= t:
            ready += pipeline.popleft()[1]
        want = int(desired[t])
        while window and window[-1][1] <= want:
            window.pop()
        window.append((t, want))
        while window[0][0] <= t - max(stabilisation, 1):
            window.popleft()
        keep = window[0][1] if stabilisation > 0 else want
        if want > live:
            pipeline.append([t + lead, want - live])
            live = want
        elif keep < live:
            drop = live - keep
            live = keep
            while drop and pipeline:
                take = min(drop, pipeline[-1][1])
                pipeline[-1][1] -= take
                drop -= take
                if pipeline[-1][1] == 0:
                    pipeline.pop()
            ready -= drop
        live_out[t] = live
        ready_out[t] = ready
    return live_out, ready_out


def oracle_virtual(
    need: IntArray, lead: int, price_ratio: float, *, instant: bool = False
) -> tuple[int, IntArray, IntArray]:
    """Owned size, live and ready virtual pods of the cheapest placement that meets ``need``.

    A pod that serves minute ``t`` must have been requested at ``t - lead`` and is paid from
    then, so at minute ``t`` the oracle pays for ``max(need[t..t+lead]) - owned`` pods.
    Cost is ``owned * n + price_ratio * sum((ahead - owned)+)`` with ``ahead`` that running
    maximum, so the threshold that is optimal for ``ahead`` is the optimal owned size.
    ``instant``: pods exist the minute they are needed and cost nothing before (no policy can
    do that; the bound without creation latency).
    """
    ahead = np.asarray(need, dtype=np.int64).copy()
    if not instant:
        for k in range(1, lead + 1):
            ahead[:-k] = np.maximum(ahead[:-k], need[k:])
    owned = optimal_threshold(ahead.astype(np.float64), price_ratio)
    live = np.maximum(ahead - owned, 0)
    ready = np.maximum(np.asarray(need, dtype=np.int64) - owned, 0)
    return owned, live, ready


@dataclass
class _Run:
    owned: list[int] = field(default_factory=list)
    live: list[IntArray] = field(default_factory=list)
    ready: list[IntArray] = field(default_factory=list)


def _allocate(
    live_total: IntArray, config: SimConfig, offset: int
) -> tuple[dict[str, IntArray], IntArray, int]:
    """Spread live virtual pods over pools/specs per minute.

    Returns pods per spec, pods that could not be placed or were lost to a site outage per
    minute, and the number of pods created on an upgraded spec.
    """
    n = live_total.size
    by_spec: dict[str, IntArray] = {}
    upgraded = np.zeros(n, dtype=np.int64)
    short = np.zeros(n, dtype=np.int64)
    per_site = {p.site: np.zeros(n, dtype=np.int64) for p in config.pools}
    outages = [
        (o.site, o.start_minute - offset, o.end_minute - offset) for o in config.site_outages
    ]
    down = {p.site: np.zeros(n, dtype=bool) for p in config.pools}
    for site, a, b in outages:
        if site in down:
            down[site][max(a, 0) : max(min(b, n), 0)] = True
    request = config.replica_requests
    for t in range(n):
        left = int(live_total[t])
        for pool in config.pools:
            if left == 0:
                break
            if down[pool.site][t] or pool.cordoned:
                continue
            fitting = [s for s in pool.specs if request.fits_in(s.resources)]
            for i, spec in enumerate(fitting):
                stock = pool.stock_of(spec.name)
                take = left if stock is None else min(left, stock)
                if take:
                    arr = by_spec.setdefault(spec.name, np.zeros(n, dtype=np.int64))
                    arr[t] += take
                    per_site[pool.site][t] += take
                    if i > 0:
                        upgraded[t] += take
                    left -= take
                if left == 0:
                    break
        short[t] = left
    lead = config.lead_minutes
    for site, a, _b in outages:
        if site in per_site and 0 < a < n:
            lost = int(per_site[site][a - 1])
            short[a : min(a + lead, n)] += lost
    created_upgraded = int(np.maximum(np.diff(upgraded, prepend=0), 0).sum())
    return by_spec, short, created_upgraded


_DayPlan = tuple[Forecast, FloatArray, Margin]
"""A day's forecast (fitted on the days before it), its load forecast, the margin applied."""


def _day_forecasts(predictor: ThresholdPredictor, d_all: FloatArray, off: int) -> list[_DayPlan]:
    """Every evaluated day forecast from the days before it only (walk-forward)."""
    out = []
    for start in range(off, d_all.size, MINUTES_PER_DAY):
        fc = predictor.fit(d_all[:start])
        day = d_all[start : start + MINUTES_PER_DAY]
        out.append((fc, fc.expected(day, previous=float(d_all[start - 1])), fc.margin))
    return out


def _targets(days: list[_DayPlan], d_all: FloatArray, off: int, lead: int) -> IntArray:
    """Replica targets: the higher of the HPA plan (forecast plus margin) and the cron floor."""
    out = []
    for i, (fc, _, margin) in enumerate(days):
        start = off + i * MINUTES_PER_DAY
        crons = cron_rules_from_profile(fc.floor, lead_minutes=lead, cover=False)
        cron_by_minute = np.repeat(
            np.array([c.replicas for c in crons]),
            [c.end_minute - c.start_minute for c in crons],
        )
        day = d_all[start : start + MINUTES_PER_DAY]
        hpa = fc.plan(day, previous=float(d_all[start - 1]), margin=margin)
        out.append(np.maximum(hpa, cron_by_minute))
    return np.concatenate(out).astype(np.int64)


def simulate(
    trace: DemandTrace,
    config: SimConfig | None = None,
    policies: Sequence[str] = POLICIES,
    *,
    hindsight: bool = False,
) -> SimulationReport:
    """Replay ``trace`` under each policy; days before ``train_days`` are only history.

    ``hindsight`` adds the ``tidal-hindsight`` bound (Tidal's policy with the margin fitted on
    the evaluated days) when ``tidal`` is among the policies.
    """
    config = config or SimConfig()
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)} or all")
    if trace.days <= config.train_days:
        raise ConfigError(
            f"trace {trace.name} has {trace.days} days; the simulator needs more than "
            f"train_days={config.train_days} so that evaluated days were never fitted on"
        )
    if "all-owned" not in policies:
        policies = ("all-owned", *policies)
    wanted_bounds = ("oracle-instant",) if "oracle" in policies else ()
    if hindsight and "tidal" in policies:
        wanted_bounds = (*wanted_bounds, "tidal-hindsight")
    policies = (*policies, *wanted_bounds)
    off = config.train_days * MINUTES_PER_DAY
    lead = config.lead_minutes
    predictor = ThresholdPredictor(
        price_ratio=config.price_ratio,
        window_days=config.predictor_window_days,
        lead_minutes=lead,
        return_period_days=config.margin_return_period_days,
    )
    runs = {p: _Run() for p in policies}
    backtests: dict[str, BacktestReport] = {}
    thresholds: dict[str, int] = {}
    margins: dict[str, Margin] = {}
    demands = []
    for svc in trace.services:
        d_all = svc.demand
        d = d_all[off:]
        need = np.ceil(d - 1e-9).astype(np.int64)
        demands.append(d)
        n = need.size
        peak = int(need.max()) if n else 0
        prev = np.concatenate([[need[0]], need[:-1]])
        day_plans: list[_DayPlan] = []
        for name in policies:
            run = runs[name]
            if name == "all-owned":
                o = peak
                live = ready = np.zeros(n, dtype=np.int64)
            elif name == "naive-overflow":
                o = math.ceil(config.naive_owned_fraction * peak)
                live, ready = run_virtual(
                    np.maximum(prev - o, 0), lead, config.naive_stabilisation_min
                )
            elif name in ("oracle", "oracle-instant"):
                o, live, ready = oracle_virtual(
                    need, lead, config.price_ratio, instant=name == "oracle-instant"
                )
            elif name == "tidal":
                o = predictor.fit(d_all[:off]).threshold_replicas
                thresholds[svc.name] = o
                if trace.days - config.train_days >= 1 and config.train_days >= 2:
                    backtests[svc.name] = predictor.backtest(
                        d_all, min_train_days=config.train_days
                    )
                days = day_plans = day_plans or _day_forecasts(predictor, d_all, off)
                margins[svc.name] = days[0][0].margin
                desired = np.maximum(_targets(days, d_all, off, lead) - o, 0)
                live, ready = run_virtual(desired, lead, config.tidal_stabilisation_min)
            else:  # tidal-hindsight: the same forecasts, the margin fitted on these very days
                days = day_plans = day_plans or _day_forecasts(predictor, d_all, off)
                f = np.concatenate([e for _, e, _ in days])
                scale = np.concatenate(
                    [np.full(e.size, fc.margin.scale_replicas) for fc, e, _ in days]
                )
                load_fraction, peak_fraction = fit_margin(
                    f[:-lead], d[lead:] - f[:-lead], scale[:-lead], config.price_ratio
                )
                days = [
                    (
                        fc,
                        e,
                        replace(
                            fc.margin,
                            load_fraction=load_fraction,
                            peak_fraction=peak_fraction,
                            safety=1.0,
                        ),
                    )
                    for fc, e, _ in days
                ]
                targets = _targets(days, d_all, off, lead)
                o = optimal_threshold(targets.astype(np.float64), config.price_ratio)
                live, ready = run_virtual(
                    np.maximum(targets - o, 0), lead, config.tidal_stabilisation_min
                )
            run.owned.append(o)
            run.live.append(live)
            run.ready.append(ready)
    demand = np.vstack(demands)
    need_all = np.ceil(demand - 1e-9)
    n = demand.shape[1]
    results: dict[str, PolicyResult] = {}
    series: dict[str, PolicySeries] = {}
    for name in policies:
        run = runs[name]
        owned = np.array(run.owned, dtype=np.int64)[:, None]
        live = np.vstack(run.live)
        ready = np.vstack(run.ready)
        by_spec, short, upgrades = _allocate(live.sum(axis=0), config, off)
        prices = {s.name: s.price_per_hour for p in config.pools for s in p.specs}
        oc = owned_cost(int(owned.sum()), n)
        vc = virtual_cost(by_spec, prices)
        owned_load = np.minimum(demand, owned)
        raw = owned.sum() / config.ceiling
        util = owned_load.sum(axis=0) / raw if raw > 0 else np.zeros(n)
        violations = slo_violation_minutes(
            need_all, (owned + ready).astype(np.float64), owned_load, owned + 0.0 * demand
        )
        if short.any():
            short_or_missing = np.vstack([need_all > owned + ready, (short > 0)[None, :]])
            violations = int(short_or_missing.any(axis=0).sum())
        results[name] = PolicyResult(
            policy=name,
            cost=oc + vc,
            owned_cost=oc,
            virtual_cost=vc,
            saving_vs_all_owned=0.0,
            slo_violation_minutes=violations,
            owned_utilisation_peak=float(util.max()) if n else 0.0,
            owned_utilisation_mean=float(util.mean()) if n else 0.0,
            virtual_pod_hours=float(live.sum() / 60.0),
            spec_upgrades=upgrades,
            owned_slots=int(owned.sum()),
        )
        series[name] = PolicySeries(
            int(owned.sum()), (owned + ready).sum(axis=0) - short, live.sum(axis=0)
        )
    base = results["all-owned"].cost
    results = {
        k: _with_saving(r, 1.0 - r.cost / base if base > 0 else 0.0) for k, r in results.items()
    }
    return SimulationReport(
        trace=trace.name,
        train_days=config.train_days,
        evaluated_days=trace.days - config.train_days,
        policies={k: r for k, r in results.items() if k not in BOUNDS},
        bounds={k: r for k, r in results.items() if k in BOUNDS},
        backtests=backtests,
        thresholds=thresholds,
        margins=margins,
        demand=demand.sum(axis=0),
        series=series,
    )


def _with_saving(r: PolicyResult, saving: float) -> PolicyResult:
    return replace(r, saving_vs_all_owned=saving)
