"""Trace-driven simulator: every policy on the same raw demand, fitted on other days.

Minutes are the clock. Every policy decides at minute ``t`` on the same observation: the
service's load as minute ``t`` starts (``obs[t]``: the raw per-minute demand, or its trailing
mean over ``smoothing_minutes`` when that is asked for; a mean lags every rise, which a reserve
must then cover, so the default is none). Pods on owned nodes start within the minute; a
virtual pod (or an autoscaled node) is paid from the minute it is requested and serves
``lead = ceil(creation_latency_s / 60)`` minutes later (0: the same minute). The SLO is counted
on raw demand: a minute is violated when some service needs more replicas (``ceil(demand)``)
than it has ready, or pods could not be placed at all (stock, a failed site).

Every policy is fitted on the *training* days (another part of the trace or another file) and
evaluated on days it had not seen when it decided: with ``refit_daily`` (the default, what the
controller does with the history it records) the fitted policies refit their reserve every
midnight on the days recorded so far and raise it the minute after a shortfall; the owned fleet
stays as fitted on the training days. Policies, each a per-service replica target plus a rule for
where the replicas run:

- ``all-owned``: every replica on owned nodes, the fleet sized in hindsight for the peak of
  the **total** (one shared fleet, bin-packed): the baseline savings are counted against.
- ``naive-overflow``: owned fleet at 70 % of that; replicas follow the load with no headroom
  and the stock HPA's 5-minute scale-down window; the rest on virtual nodes.
- ``reactive-reserve``: what a user would run without Tidal: the load plus a fixed spare
  reserve per service (the largest rise within the creation latency on the training days),
  owned up to a threshold fitted on the training days, the rest virtual.
- ``cluster-autoscaler``: the same targets, but instead of virtual nodes the fleet grows by
  whole nodes when pods are pending (node start-up in minutes, scale-down after a delay),
  paid per node-minute at ``autoscaler_price_ratio``.
- ``tidal``: the load extrapolated by its last rise over the lead time, never below the floor
  every training day reached ``lead`` minutes later (the cron floor: a daily step is
  scheduled, not a surprise), plus a reserve for what that misses on the training days,
  scaled to a Gumbel return level of its daily maxima (``reserve_return_period_days``).
- ``oracle``: knows the evaluated demand and plays by the same rules (requests each virtual
  pod exactly ``lead`` minutes before it is needed); thresholds optimal in hindsight.

Bounds, not policies: ``oracle-instant`` (no creation latency), ``tidal-hindsight`` (Tidal's
reserve fitted on the evaluated days), ``all-owned-per-service`` (the old baseline: each
service's own peak, not shared).

Owned capacity: replicas have sizes (CPU, memory, GPUs); GPU pods go to GPU nodes. A policy's
fleet holds its per-service thresholds at once, packed first-fit decreasing
(:mod:`tidal.sched.packing`) onto nodes of ``owned_node`` / ``gpu_node`` whose allocatable is
capacity x ceiling (GPUs whole), so the ceiling holds by construction. Prices are per resource
(:class:`~tidal.sched.cost.ResourcePrices`): a node costs what its allocatable is worth, a
virtual pod ``price_ratio`` x its spec. Thresholds are per service (the extender's unit
``max``); only ``all-owned`` shares capacity across services' peaks, so the hybrid policies'
figures are if anything pessimistic.
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
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.cost import ResourcePrices
from tidal.sched.model import Resources, VirtualPool, VirtualSpec
from tidal.sched.packing import ffd_nodes, fits
from tidal.sched.policy import (
    DEFAULT_RETURN_PERIOD_DAYS,
    Reserve,
    TidalPolicy,
    ceil_replicas,
    fit_reserve,
    observe,
    react_to_misses,
    refit_windows,
)
from tidal.sched.predictor import optimal_threshold
from tidal.sched.settings import POLICIES
from tidal.sched.traces import DemandTrace

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

BOUNDS = ("oracle-instant", "tidal-hindsight", "all-owned-per-service")
"""Reported beside the policies, never as one: see the module docstring."""
WRITEUP_PRICE_RATIO = 1.5
DEFAULT_OWNED_NODE = Resources(40_000, 80 * 1024)
"""40 CPUs / 80 GiB: under a 0.6 ceiling it holds 12 replicas of 2c4g exactly, so the unit of
the reports (one 2c4g replica-hour on owned capacity) is what an owned slot costs."""
DEFAULT_GPU_NODE = Resources(64_000, 256 * 1024, 8)


def default_pools(
    price_ratio: float = WRITEUP_PRICE_RATIO,
    base_stock: int | None = None,
    prices: ResourcePrices | None = None,
) -> tuple[VirtualPool, ...]:
    """Two sites selling 1c2g -> 2c4g -> 4c8g -> 8c16g -> 16c32g, plus GPU specs, each at
    ``price_ratio`` times the owned price of its resources."""
    p = prices or ResourcePrices()
    names = ("1c2g", "2c4g", "4c8g", "8c16g", "16c32g")
    specs = tuple(
        VirtualSpec(n, r, price_ratio * p.of(r)) for n in names for r in [Resources.parse(n)]
    )
    gpu_names = ("4c16g1gpu", "8c32g2gpu", "16c64g4gpu")
    gpu = tuple(
        VirtualSpec(n, r, price_ratio * p.of(r)) for n in gpu_names for r in [Resources.parse(n)]
    )
    stock = {} if base_stock is None else {"2c4g": base_stock}
    return (
        VirtualPool("vk-cloud-a", NodeName("virtual-kubelet-cloud-a"), "cloud-a", specs, stock),
        VirtualPool("vk-cloud-b", NodeName("virtual-kubelet-cloud-b"), "cloud-b", specs, stock),
        VirtualPool("vk-gpu-a", NodeName("virtual-kubelet-gpu-a"), "cloud-a", gpu),
        VirtualPool("vk-gpu-b", NodeName("virtual-kubelet-gpu-b"), "cloud-b", gpu),
    )


@dataclass(frozen=True)
class SiteOutage:
    site: str
    start_minute: int
    """Minute from the start of the trace (with a separate evaluation trace: of that one)."""
    end_minute: int


@dataclass(frozen=True)
class SimConfig:
    price_ratio: float = WRITEUP_PRICE_RATIO
    creation_latency_s: float = 60.0
    ceiling: float = 0.6
    train_days: int = 7
    """With one trace: the first days are fitted on, the rest evaluated."""
    smoothing_minutes: int = 1
    """Decisions see the trailing mean of this many minutes of raw demand (1: raw)."""
    naive_owned_fraction: float = 0.7
    naive_stabilisation_min: int = 5
    """The stock HPA's scale-down stabilisation window (300 s), which the naive policy keeps."""
    stabilisation_min: int = 1
    """Scale-down window of reactive-reserve, cluster-autoscaler and Tidal: short, since
    virtual pods bill per use (Tidal's HPA sets ``behavior.scaleDown`` so)."""
    prices: ResourcePrices = field(default_factory=ResourcePrices)
    owned_node: Resources = DEFAULT_OWNED_NODE
    gpu_node: Resources = DEFAULT_GPU_NODE
    pools: tuple[VirtualPool, ...] = field(default_factory=default_pools)
    site_outages: tuple[SiteOutage, ...] = ()
    trend_gain: float = 1.0
    """Tidal extrapolates the last minute's rise over the lead time by this share."""
    reserve_return_period_days: float = DEFAULT_RETURN_PERIOD_DAYS
    """Tidal's reserve is the Gumbel level of its daily maximum misses exceeded once in this
    many days per service. Chosen on synthetic seeds 1-5 only (see
    :data:`tidal.sched.policy.DEFAULT_RETURN_PERIOD_DAYS`)."""
    refit_daily: bool = True
    """reactive-reserve, cluster-autoscaler and Tidal refit their reserve (Tidal: and floor)
    every midnight on the days recorded so far, as the controller refits on its history; the
    owned fleet stays as fitted on the training days. False: the training days only."""
    refit_window_days: int | None = None
    """How many recorded days a refit uses (None: all of them)."""
    react_to_misses: bool = True
    """With ``refit_daily``: the reserve rises the minute after a shortfall to the largest
    miss since midnight (:func:`tidal.sched.policy.react_to_misses`)."""
    autoscaler_startup_s: float = 180.0
    autoscaler_scale_down_s: float = 600.0
    """cluster-autoscaler's ``scale-down-unneeded-time`` default (10 min)."""
    autoscaler_price_ratio: float | None = None
    """Price of an autoscaled node relative to an owned one (None: ``price_ratio``, so the
    comparison is about whole nodes and start-up time, not about the price)."""

    def __post_init__(self) -> None:
        if self.creation_latency_s < 0:
            raise ConfigError(f"creation latency must be >= 0 s, got {self.creation_latency_s}")
        if self.price_ratio <= 0:
            raise ConfigError(f"price ratio must be positive, got {self.price_ratio}")
        if self.smoothing_minutes < 1:
            raise ConfigError(f"smoothing must be >= 1 minute, got {self.smoothing_minutes}")
        if not 0 < self.ceiling <= 1:
            raise ConfigError(f"ceiling must be in (0, 1], got {self.ceiling}")
        if self.reserve_return_period_days <= 1:
            raise ConfigError("the reserve's return period must be more than one day")

    @property
    def lead_minutes(self) -> int:
        return math.ceil(self.creation_latency_s / 60.0 - 1e-9)

    def node_for(self, req: Resources) -> Resources:
        """Allocatable of the owned node class that serves ``req`` (GPU pods: GPU nodes)."""
        node = self.gpu_node if req.gpu else self.owned_node
        return node.scaled(self.ceiling)


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
    """Replicas the owned fleet is sized to hold (sum of thresholds)."""
    owned_nodes: int = 0
    autoscaled_node_hours: float = 0.0

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
            "owned_nodes": self.owned_nodes,
            "autoscaled_node_hours": round(self.autoscaled_node_hours, 2),
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
    thresholds: dict[str, int]
    """Tidal's owned threshold per service."""
    reserves: dict[str, Reserve]
    demand: FloatArray = field(repr=False)
    series: dict[str, PolicySeries] = field(repr=False, default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "trace": self.trace,
            "train_days": self.train_days,
            "evaluated_days": self.evaluated_days,
            "policies": {name: r.to_json() for name, r in self.policies.items()},
            "bounds": {name: r.to_json() for name, r in self.bounds.items()},
            "thresholds": self.thresholds,
            "reserves": {
                svc: {
                    "replicas": round(r.replicas, 2),
                    "in_sample_max": round(r.in_sample_max, 2),
                    "return_level": None if r.return_level is None else round(r.return_level, 2),
                    "days": r.days,
                    "floor_peak": round(r.floor_peak, 2),
                }
                for svc, r in self.reserves.items()
            },
            "warnings": list(self.warnings),
        }


def run_virtual(desired: IntArray, lead: int, stabilisation: int) -> tuple[IntArray, IntArray]:
    """Live (billed) and ready virtual pods per minute for a desired-count series.

    ``desired[t]`` is decided as minute ``t`` starts; pods requested then are billed from
    minute ``t`` and ready from minute ``t + lead`` (``lead`` 0: at once). Scale-down keeps the
    highest desire of the last ``stabilisation`` minutes (HPA semantics), removes not-yet-ready
    pods first (newest first) and takes effect at once.
    """
    n = desired.size
    live_out = np.zeros(n, dtype=np.int64)
    ready_out = np.zeros(n, dtype=np.int64)
    pipeline: deque[list[int]] = deque()  # [ready_minute, count], oldest first
    # warm start: the minute before the run already had what it wanted
    live = ready = int(desired[0]) if n else 0
    window: deque[tuple[int, int]] = deque()  # monotonic max of recent desires
    for t in range(n):
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
        while pipeline and pipeline[0][0] <= t:
            ready += pipeline.popleft()[1]
        live_out[t] = live
        ready_out[t] = ready
    return live_out, ready_out


def ahead_of(need: IntArray, lead: int) -> IntArray:
    """``max(need[t .. t + lead])``: what must have been requested by ``t`` to serve in time."""
    ahead = np.asarray(need, dtype=np.int64).copy()
    for k in range(1, lead + 1):
        ahead[:-k] = np.maximum(ahead[:-k], need[k:])
    return ahead


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
    ahead = np.asarray(need, dtype=np.int64) if instant else ahead_of(need, lead)
    owned = optimal_threshold(ahead.astype(np.float64), price_ratio)
    live = np.maximum(ahead - owned, 0)
    ready = np.maximum(np.asarray(need, dtype=np.int64) - owned, 0)
    return owned, live, ready


@dataclass(frozen=True)
class _Service:
    name: str
    requests: Resources
    train: FloatArray = field(repr=False)
    demand: FloatArray = field(repr=False)
    """Evaluated days, raw."""
    owned_price: float
    """Per replica-hour on owned nodes (node price x its share of a node)."""
    virtual_price: float
    """Per pod-hour of the smallest virtual spec that holds it."""


class _Plan:
    """Per-service targets and thresholds of one policy on the evaluated days."""

    def __init__(self, n_services: int, n: int) -> None:
        self.targets = np.zeros((n_services, n), dtype=np.int64)
        self.thresholds = np.zeros(n_services, dtype=np.int64)
        self.stabilisation = 1
        self.lead = 0
        self.offset = 0
        """Minutes of the trace before the evaluated days (site outages are timed from 0)."""
        self.fitted: list[IntArray] = [np.zeros(0, dtype=np.int64)] * n_services
        """The target series each threshold was fitted on (training days; the oracle's own)."""


def _ratio(svc: _Service) -> float:
    """Virtual over owned price of one replica of the service (node packing included)."""
    return svc.virtual_price / svc.owned_price if svc.owned_price > 0 else math.inf


def _threshold(train_targets: IntArray, svc: _Service) -> int:
    """Cost-optimal owned replicas for a target series, at the service's own price ratio."""
    return optimal_threshold(train_targets.astype(np.float64), _ratio(svc))


def simulate(
    trace: DemandTrace,
    config: SimConfig | None = None,
    policies: Sequence[str] = POLICIES,
    *,
    eval_trace: DemandTrace | None = None,
    hindsight: bool = False,
) -> SimulationReport:
    """Fit every policy on the training days and evaluate it on the others.

    ``trace`` alone: its first ``train_days`` days train, the rest are evaluated. With
    ``eval_trace``: ``trace`` is the whole training input and ``eval_trace`` is evaluated
    (services are matched by name). ``hindsight`` adds the ``tidal-hindsight`` bound.
    """
    config = config or SimConfig()
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)} or all")
    warnings = list(trace.warnings)
    if eval_trace is None:
        if trace.days <= config.train_days:
            raise ConfigError(
                f"trace {trace.name} has {trace.days} days; the simulator needs more than "
                f"train_days={config.train_days} so that evaluated days were never fitted on "
                "(or pass a separate evaluation trace)"
            )
        train, evaluated = trace.split(config.train_days)
    else:
        train, evaluated = trace, eval_trace
        warnings += [w for w in eval_trace.warnings if w not in warnings]
        missing = [
            s.name for s in evaluated.services if s.name not in {t.name for t in train.services}
        ]
        if missing:
            raise ConfigError(
                f"evaluation trace {evaluated.name} has services {missing} that the training "
                f"trace {train.name} lacks; nothing could be fitted for them"
            )
    if evaluated.days < 2:
        warnings.append(
            f"only {evaluated.days} evaluated day: one day says little about a policy; "
            "evaluate on a week if the trace has one"
        )
    if train.days < 2:
        warnings.append(
            f"only {train.days} training day: the reserve and the floor rest on a single day"
        )
    if "all-owned" not in policies:
        policies = ("all-owned", *policies)
    lead = config.lead_minutes
    by_name = {s.name: s for s in train.services}
    services: list[_Service] = []
    for s in evaluated.services:
        node = config.node_for(s.requests)
        k = fits(node, s.requests)
        if k == 0:
            raise ConfigError(
                f"service {s.name}: a replica of {s.requests} does not fit an owned node "
                f"({node} allocatable); pass a larger node"
            )
        services.append(
            _Service(
                s.name,
                s.requests,
                by_name[s.name].demand,
                s.demand,
                config.prices.of(node) / k,
                _spec_price(config, s.requests),
            )
        )
    n = evaluated.minutes
    n_s = len(services)
    need = np.vstack([ceil_replicas(s.demand) for s in services])
    results: dict[str, PolicyResult] = {}
    series: dict[str, PolicySeries] = {}
    thresholds: dict[str, int] = {}
    reserves: dict[str, Reserve] = {}
    wanted = list(policies)
    if "oracle" in policies:
        wanted.append("oracle-instant")
    if hindsight and "tidal" in policies:
        wanted.append("tidal-hindsight")
    wanted.append("all-owned-per-service")
    for name in wanted:
        plan = _Plan(n_s, n)
        plan.lead = lead
        plan.offset = train.minutes if eval_trace is None else 0
        plan.stabilisation = config.stabilisation_min
        if name in ("all-owned", "all-owned-per-service"):
            results[name] = _all_owned(name, services, need, config, shared=name == "all-owned")
            series[name] = PolicySeries(
                int(results[name].owned_slots), need.sum(axis=0), np.zeros(n, dtype=np.int64)
            )
            continue
        for i, svc in enumerate(services):
            obs_tr = observe(svc.train, config.smoothing_minutes)
            obs = observe(np.concatenate([svc.train, svc.demand]), config.smoothing_minutes)[
                svc.train.size :
            ]
            if name == "naive-overflow":
                plan.targets[i] = ceil_replicas(obs)
                plan.stabilisation = config.naive_stabilisation_min
                plan.thresholds[i] = math.ceil(config.naive_owned_fraction * int(need[i].max()))
            elif name in ("reactive-reserve", "cluster-autoscaler"):
                reserve = fit_reserve(obs_tr, svc.train, lead, None)[0]
                plan.targets[i] = ceil_replicas(obs) + reserve
                if config.refit_daily:
                    plan.targets[i] = ceil_replicas(obs) + _reactive_online(svc, lead, config)
                plan.fitted[i] = ceil_replicas(obs_tr) + reserve
                plan.thresholds[i] = _threshold(plan.fitted[i], svc)
            elif name in ("tidal", "tidal-hindsight"):
                policy = TidalPolicy(
                    price_ratio=_ratio(svc),
                    lead_minutes=lead,
                    trend_gain=config.trend_gain,
                    return_period_days=config.reserve_return_period_days,
                    smoothing_minutes=config.smoothing_minutes,
                )
                fit = policy.fit(
                    svc.train, hindsight_on=svc.demand if name == "tidal-hindsight" else None
                )
                plan.targets[i] = fit.targets(obs, float(obs_tr[-1]))
                if name == "tidal" and config.refit_daily:
                    online = policy.online(
                        svc.train,
                        svc.demand,
                        window_days=config.refit_window_days,
                        react=config.react_to_misses,
                    )
                    plan.targets[i] = online.targets
                plan.fitted[i] = fit.history_targets
                plan.thresholds[i] = fit.threshold_replicas
                if name == "tidal":
                    reserves[svc.name] = fit.reserve
                    thresholds[svc.name] = int(plan.thresholds[i])
            elif name in ("oracle", "oracle-instant"):
                instant = name == "oracle-instant"
                plan.lead = 0 if instant else lead
                plan.stabilisation = 0
                ahead = need[i] if instant else ahead_of(need[i], lead)
                plan.targets[i] = ahead
                plan.fitted[i] = ahead
                plan.thresholds[i] = _threshold(ahead, svc)
        if name != "naive-overflow":
            plan.thresholds = _fill_fleet(services, plan.thresholds, plan.fitted, config)
        if name == "cluster-autoscaler":
            results[name], series[name] = _run_autoscaler(name, services, need, plan, config)
        else:
            results[name], series[name] = _run(name, services, need, plan, config)
    base_cost = results["all-owned"].cost
    results = {
        k: replace(r, saving_vs_all_owned=1.0 - r.cost / base_cost if base_cost > 0 else 0.0)
        for k, r in results.items()
    }
    shown = [p for p in POLICIES if p in policies]
    return SimulationReport(
        trace=evaluated.name if eval_trace is not None else trace.name,
        train_days=train.days,
        evaluated_days=evaluated.days,
        policies={k: results[k] for k in shown},
        bounds={k: results[k] for k in BOUNDS if k in results},
        thresholds=thresholds,
        reserves=reserves,
        demand=np.vstack([s.demand for s in services]).sum(axis=0),
        series=series,
        warnings=tuple(warnings),
    )


def _reactive_online(svc: _Service, lead: int, config: SimConfig) -> IntArray:
    """reactive-reserve's reserve per evaluated minute when it is refitted like Tidal's: every
    midnight on the days recorded so far, raised the minute after a shortfall."""
    whole = np.concatenate([svc.train, svc.demand])
    obs = observe(whole, config.smoothing_minutes)
    windows = refit_windows(svc.train.size, svc.demand.size, config.refit_window_days)
    daily = np.array(
        [fit_reserve(obs[lo:start], whole[lo:start], lead, None)[0] for lo, start in windows],
        dtype=np.int64,
    )
    if not config.react_to_misses:
        return np.repeat(daily, MINUTES_PER_DAY)[: svc.demand.size]
    ev_obs = obs[svc.train.size :]
    return react_to_misses(ev_obs, ceil_replicas(svc.demand), lead, daily)


def _spec_price(config: SimConfig, req: Resources) -> float:
    prices = [s.price_per_hour for p in config.pools for s in p.specs if req.fits_in(s.resources)]
    if not prices:
        raise ConfigError(
            f"no virtual spec holds a replica of {req}; declare a larger spec in the pools"
        )
    return min(prices)


def _fleet(
    services: Sequence[_Service], counts: Sequence[int], config: SimConfig
) -> tuple[int, float]:
    """Nodes (per class, summed) and their price per hour to hold ``counts`` replicas at once."""
    classes: dict[Resources, list[tuple[Resources, int]]] = {}
    for svc, c in zip(services, counts, strict=True):
        classes.setdefault(config.node_for(svc.requests), []).append((svc.requests, int(c)))
    nodes = 0
    price = 0.0
    for node, items in classes.items():
        k = ffd_nodes(items, node)
        nodes += k
        price += k * config.prices.of(node)
    return nodes, price


def _fill_fleet(
    services: Sequence[_Service],
    thresholds: IntArray,
    fitted: Sequence[IntArray],
    config: SimConfig,
) -> IntArray:
    """Raise thresholds into the room the whole nodes leave: the fleet is bought anyway.

    One replica at a time to the service whose fitted targets exceed its threshold most
    often, as long as the packing needs no more nodes.
    """
    out = np.array(thresholds, dtype=np.int64)
    nodes, _ = _fleet(services, list(out), config)
    done = [f.size == 0 for f in fitted]
    while not all(done):
        gain = [-1 if done[i] else int((fitted[i] > out[i]).sum()) for i in range(len(services))]
        best = int(np.argmax(gain))
        if gain[best] <= 0:
            break
        out[best] += 1
        if _fleet(services, list(out), config)[0] > nodes:
            out[best] -= 1
            done[best] = True
    return out


def _utilisation(
    services: Sequence[_Service], owned: IntArray, config: SimConfig, nodes_price: float
) -> tuple[float, float]:
    """Peak and mean share of the owned fleet's raw capacity requested (<= the ceiling)."""
    if nodes_price <= 0:
        return 0.0, 0.0
    used = sum(
        (config.prices.of(s.requests) * owned[i] for i, s in enumerate(services)),
        start=np.zeros(owned.shape[1]),
    )
    util = used / (nodes_price / config.ceiling)
    return float(util.max()), float(util.mean())


def _all_owned(
    name: str, services: Sequence[_Service], need: IntArray, config: SimConfig, *, shared: bool
) -> PolicyResult:
    n = need.shape[1]
    if shared:
        # the fleet must hold every minute's replicas at once: pack the busiest minutes (by
        # their weight in node shares; a minute below all of them cannot need more nodes)
        weight = sum(
            (
                need[i] / fits(config.node_for(s.requests), s.requests)
                for i, s in enumerate(services)
            ),
            start=np.zeros(n),
        )
        top = np.argsort(weight)[-32:]
        best = (0, 0.0)
        for t in top:
            cand = _fleet(services, [int(need[i, t]) for i in range(len(services))], config)
            best = max(best, cand)
        nodes, price = best
        slots = int(need.sum(axis=0).max())
    else:
        nodes, price = _fleet(services, [int(need[i].max()) for i in range(len(services))], config)
        slots = int(need.max(axis=1).sum())
    oc = price * n / 60.0
    peak, mean = _utilisation(services, need, config, price)
    return PolicyResult(name, oc, oc, 0.0, 0.0, 0, peak, mean, 0.0, 0, slots, nodes)


def _run(
    name: str, services: Sequence[_Service], need: IntArray, plan: _Plan, config: SimConfig
) -> tuple[PolicyResult, PolicySeries]:
    n = need.shape[1]
    owned = np.minimum(plan.targets, plan.thresholds[:, None])
    live = np.zeros_like(plan.targets)
    ready = np.zeros_like(plan.targets)
    for i in range(len(services)):
        live[i], ready[i] = run_virtual(
            np.maximum(plan.targets[i] - plan.thresholds[i], 0), plan.lead, plan.stabilisation
        )
    nodes, node_price = _fleet(services, list(plan.thresholds), config)
    by_spec, short, upgrades = _allocate(services, live, config, plan.offset)
    oc = node_price * n / 60.0
    vc = sum(pods.sum() * price / 60.0 for (_, price), pods in by_spec.items())
    capacity = plan.thresholds[:, None] + ready
    bad = (need > capacity).any(axis=0) | (short > 0)
    peak, mean = _utilisation(services, owned, config, node_price)
    result = PolicyResult(
        name,
        oc + vc,
        oc,
        float(vc),
        0.0,
        int(bad.sum()),
        peak,
        mean,
        float(live.sum() / 60.0),
        upgrades,
        int(plan.thresholds.sum()),
        nodes,
    )
    return result, PolicySeries(
        int(plan.thresholds.sum()), capacity.sum(axis=0) - short, live.sum(axis=0)
    )


def _run_autoscaler(
    name: str, services: Sequence[_Service], need: IntArray, plan: _Plan, config: SimConfig
) -> tuple[PolicyResult, PolicySeries]:
    """Owned fleet for the thresholds; pods above them are pending until autoscaled nodes (of
    the owned shape, started on demand) are ready. A node is requested as soon as pods are
    pending (the autoscaler's scan), serves after ``autoscaler_startup_s`` and is removed once
    unneeded for ``autoscaler_scale_down_s``. Counted per node class in node shares."""
    n = need.shape[1]
    startup = math.ceil(config.autoscaler_startup_s / 60.0 - 1e-9)
    delay = math.ceil(config.autoscaler_scale_down_s / 60.0 - 1e-9)
    ratio = config.autoscaler_price_ratio or config.price_ratio
    thresholds = plan.thresholds[:, None]
    live_pods = np.zeros_like(plan.targets)
    for i in range(len(services)):
        live_pods[i], _ = run_virtual(plan.targets[i], 0, plan.stabilisation)
    excess = np.maximum(live_pods - thresholds, 0)
    wanted = np.maximum(need - thresholds, 0)
    classes: dict[Resources, list[int]] = {}
    for i, s in enumerate(services):
        classes.setdefault(config.node_for(s.requests), []).append(i)
    cost_nodes = 0.0
    node_hours = 0.0
    bad = (need > live_pods).any(axis=0)
    for node, idx in classes.items():
        shares = np.array([1.0 / fits(node, services[i].requests) for i in idx])[:, None]
        required = ceil_replicas((excess[idx] * shares).sum(axis=0))
        nodes_live, nodes_ready = run_virtual(required, startup, delay)
        bad |= (wanted[idx] * shares).sum(axis=0) > nodes_ready + 1e-9
        node_hours += float(nodes_live.sum() / 60.0)
        cost_nodes += float(nodes_live.sum() / 60.0 * config.prices.of(node) * ratio)
    nodes, node_price = _fleet(services, list(plan.thresholds), config)
    oc = node_price * n / 60.0
    owned = np.minimum(live_pods, thresholds)
    peak, mean = _utilisation(services, owned, config, node_price)
    result = PolicyResult(
        name,
        oc + cost_nodes,
        oc,
        cost_nodes,
        0.0,
        int(bad.sum()),
        peak,
        mean,
        0.0,
        0,
        int(plan.thresholds.sum()),
        nodes,
        node_hours,
    )
    return result, PolicySeries(
        int(plan.thresholds.sum()), np.minimum(live_pods, need).sum(axis=0), excess.sum(axis=0)
    )


def _allocate(
    services: Sequence[_Service], live: IntArray, config: SimConfig, offset: int = 0
) -> tuple[dict[tuple[str, float], IntArray], IntArray, int]:
    """Spread live virtual pods over pools and specs, minute by minute.

    Pods of each service take the smallest spec that holds them in the first usable pool;
    when it is sold out they are upgraded along the pool's list (at the bigger spec's price),
    then the next pool (site) is tried. Returns pods per (spec, price) per minute, pods that
    could not be placed or were lost to a site outage per minute, and pods created upgraded.
    """
    n = live.shape[1]
    by_spec: dict[tuple[str, float], IntArray] = {}
    short = np.zeros(n, dtype=np.int64)
    limited = (
        any(p.stock for p in config.pools)
        or config.site_outages
        or any(p.cordoned for p in config.pools)
    )
    if not limited:  # the common case, vectorised: the cheapest fitting spec, no shortage
        for i, s in enumerate(services):
            spec = min(
                (sp for p in config.pools for sp in p.specs if s.requests.fits_in(sp.resources)),
                key=lambda sp: sp.price_per_hour,
            )
            key = (spec.name, spec.price_per_hour)
            by_spec[key] = by_spec.get(key, np.zeros(n, dtype=np.int64)) + live[i]
        return by_spec, short, 0
    upgraded = np.zeros(n, dtype=np.int64)
    per_site = {p.site: np.zeros(n, dtype=np.int64) for p in config.pools}
    down = {p.site: np.zeros(n, dtype=bool) for p in config.pools}
    for o in config.site_outages:
        if o.site in down:
            a, b = o.start_minute - offset, o.end_minute - offset
            down[o.site][max(a, 0) : max(min(b, n), 0)] = True
    fitting = {
        (i, pool.name): [sp for sp in pool.specs if s.requests.fits_in(sp.resources)]
        for i, s in enumerate(services)
        for pool in config.pools
    }
    for t in range(n):
        stock = {(p.name, sp.name): p.stock_of(sp.name) for p in config.pools for sp in p.specs}
        for i in range(len(services)):
            left = int(live[i, t])
            for pool in config.pools:
                if left == 0:
                    break
                if down[pool.site][t] or pool.cordoned:
                    continue
                for j, spec in enumerate(fitting[(i, pool.name)]):
                    have = stock[(pool.name, spec.name)]
                    take = left if have is None else min(left, have)
                    if take:
                        key = (spec.name, spec.price_per_hour)
                        arr = by_spec.setdefault(key, np.zeros(n, dtype=np.int64))
                        arr[t] += take
                        per_site[pool.site][t] += take
                        if have is not None:
                            stock[(pool.name, spec.name)] = have - take
                        if j > 0:
                            upgraded[t] += take
                        left -= take
                    if left == 0:
                        break
            short[t] += left
    lead = max(config.lead_minutes, 1)
    for o in config.site_outages:
        a = o.start_minute - offset
        if o.site in per_site and 0 < a < n:
            lost = int(per_site[o.site][a - 1])
            short[a : min(a + lead, n)] += lost
    created_upgraded = int(np.maximum(np.diff(upgraded, prepend=0), 0).sum())
    return by_spec, short, created_upgraded
