"""Built-in rule and policy types, registered as entry points in ``tidal.qos.rules``.

Each is a frozen dataclass of its parameters with ``from_params`` (validation) and
``evaluate(snapshot) -> list[Advice]`` (pure). CPU first: offline groups are suppressed
(weight, then quota) before online groups are raised; memory is never shrunk below use.

- ``utilisation_budget``: offline CPU = capacity x threshold - online use - system use, floored;
  recomputed every round (what production co-location agents do).
- ``slo_feedback``: the seed's design. Offline weight is minimal whenever online work runs (free
  for offline when the online group idles); offline quota steps down while the online p95 nears
  the SLO, drops to its floor once the SLO is broken, and steps back up while the p95 is well
  inside; the online quota is raised last.
- ``cpu_spike``: online groups using most of their quota (or throttled) get more quota/burst.
- ``memory_guard``: online groups near their memory limit get more; offline limits shrink
  under node memory pressure, never below the group's working set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from tidal.cgroups import MIN_SHARES, CpuLimits
from tidal.errors import RuleError
from tidal.qos.snapshot import Advice, ContainerView, Snapshot
from tidal.validation import convert


class _Params:
    """``from_params``: the YAML parameters through :func:`tidal.validation.convert` (names
    and types against the dataclass's fields), then the type's own :meth:`check`."""

    name: ClassVar[str]

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str) -> Any:
        obj = convert(
            params,
            cls,
            where=where,
            noun="parameter",
            type_says="parameter {key} must be {type}, got {value!r}",
            error=RuleError,
        )
        problem = obj.check()
        if problem:
            raise RuleError(f"{where}: {problem}")
        return obj

    def check(self) -> str | None:
        return None


def _quota_cores(limits: CpuLimits, capacity: float) -> float:
    q = limits.quota_cores
    return capacity if q is None else min(q, capacity)


def _with_quota(limits: CpuLimits, cores: float | None) -> CpuLimits:
    quota = None if cores is None else max(1000, round(cores * limits.period_us))
    return replace(limits, quota_us=quota)


@dataclass(frozen=True)
class UtilisationBudget(_Params):
    name: ClassVar[str] = "utilisation_budget"
    threshold: float = 0.65
    """Target node utilisation; what is left under it after online and system use goes offline."""
    floor_cores: float = 0.1
    """Offline work never stops completely (starvation makes batch jobs time out and retry)."""
    offline_shares: int = 0
    """If > 0, also set this cpu.shares on offline groups (2 = BestEffort)."""

    def check(self) -> str | None:
        if not 0 < self.threshold <= 1:
            return "threshold must be in (0, 1]"
        if self.floor_cores <= 0:
            return "floor_cores must be positive"
        return None

    def evaluate(self, snapshot: Snapshot) -> list[Advice]:
        offline = snapshot.by_priority("offline")
        if not offline:
            return []
        capacity = snapshot.node.capacity_cores
        online_use = sum(c.cpu_cores for c in snapshot.by_priority("online"))
        offline_use = sum(c.cpu_cores for c in offline)
        busy = snapshot.node.cpu_busy_cores
        system = max(0.0, busy - online_use - offline_use) if busy is not None else 0.0
        budget = max(self.floor_cores, capacity * self.threshold - online_use - system)
        advice = []
        weights = [_quota_cores(c.baseline, capacity) for c in offline]
        total_w = sum(weights) or 1.0
        for c, w in zip(offline, weights, strict=True):
            share = max(self.floor_cores / len(offline), budget * w / total_w)
            cap = c.baseline.quota_cores
            target = _with_quota(c.current, share if cap is None else min(share, cap))
            if self.offline_shares:
                target = replace(target, shares=max(MIN_SHARES, self.offline_shares))
            advice.append(
                Advice(
                    c.cgroup,
                    self.name,
                    f"budget {budget:.2f} cores = {capacity:g} x {self.threshold:g} - online "
                    f"{online_use:.2f} - system {system:.2f}",
                    cpu=target,
                )
            )
        return advice


@dataclass(frozen=True)
class SloFeedback(_Params):
    name: ClassVar[str] = "slo_feedback"
    tighten_at: float = 0.7
    """Tighten offline when the online p95 exceeds this fraction of the SLO."""
    loosen_below: float = 0.4
    """Loosen offline when the online p95 is below this fraction of the SLO."""
    step_cores: float = 0.25
    floor_cores: float = 0.2
    offline_shares: int = MIN_SHARES
    """cpu.shares for offline groups while online work runs (2 = as weak as the kernel allows)."""
    online_idle_cores: float = 0.05
    """Below this online use, contention is gone: offline weight goes back to its spec."""
    online_ceiling_factor: float = 1.5
    """Online quota may be raised up to this multiple of its spec (when offline is at its floor)."""

    def check(self) -> str | None:
        if not 0 < self.loosen_below < self.tighten_at <= 1.5:
            return "need 0 < loosen_below < tighten_at <= 1.5"
        if self.step_cores <= 0 or self.floor_cores <= 0:
            return "step_cores and floor_cores must be positive"
        if self.online_ceiling_factor < 1:
            return "online_ceiling_factor must be >= 1"
        return None

    def _pressure(
        self, snapshot: Snapshot, online: list[ContainerView]
    ) -> tuple[float | None, str]:
        """How close the online service is to its SLO, as a fraction (1.0 = at the SLO)."""
        slo = snapshot.slo
        latency = snapshot.online_latency_ms()
        if slo.p95_latency_ms and latency is not None:
            return (
                latency / slo.p95_latency_ms,
                f"p95 {latency:.0f} ms vs SLO {slo.p95_latency_ms:g} ms",
            )
        if slo.cpu_usage_ceiling and online:
            cap = snapshot.node.capacity_cores
            ratio = max(c.cpu_cores / _quota_cores(c.current, cap) for c in online)
            return (
                ratio / slo.cpu_usage_ceiling,
                f"online CPU at {ratio:.0%} of quota vs ceiling {slo.cpu_usage_ceiling:.0%}",
            )
        return None, "no SLO signal"

    def evaluate(self, snapshot: Snapshot) -> list[Advice]:
        online, offline = snapshot.by_priority("online"), snapshot.by_priority("offline")
        capacity = snapshot.node.capacity_cores
        pressure, why = self._pressure(snapshot, online)
        online_active = sum(c.cpu_cores for c in online) > self.online_idle_cores
        tighten = pressure is not None and pressure > self.tighten_at
        loosen = pressure is None or pressure < self.loosen_below
        urgent = pressure is not None and pressure > 1.0
        advice: list[Advice] = []

        at_floor = True
        for c in offline:
            target = c.current
            if online_active:
                target = replace(target, shares=self.offline_shares)
            elif loosen:
                target = replace(target, shares=c.baseline.shares)
            cur_q = _quota_cores(c.current, capacity)
            base_q = c.baseline.quota_cores
            if tighten:
                # Past the SLO there is no time for steps: drop to the floor, then climb back.
                new_q = (
                    self.floor_cores if urgent else max(self.floor_cores, cur_q - self.step_cores)
                )
                target = _with_quota(target, min(cur_q, new_q))
            elif loosen and c.current.quota_us != c.baseline.quota_us:
                new_q = cur_q + self.step_cores
                limit = capacity if base_q is None else base_q
                target = (
                    replace(target, quota_us=c.baseline.quota_us)
                    if new_q >= limit
                    else _with_quota(target, new_q)
                )
            if _quota_cores(c.current, capacity) > self.floor_cores + 1e-9:
                at_floor = False  # judged on values in force: squeeze offline before online
            if target != c.current:
                verb = "tighten" if tighten else ("loosen" if loosen else "hold quota")
                advice.append(Advice(c.cgroup, self.name, f"{verb} offline: {why}", cpu=target))

        for c in online:
            base_q = c.baseline.quota_cores
            if base_q is None:
                continue
            cur_q = _quota_cores(c.current, capacity)
            if urgent and at_floor:
                ceiling = min(capacity, base_q * self.online_ceiling_factor)
                new_q = min(ceiling, cur_q + self.step_cores)
                if new_q > cur_q + 1e-9:
                    target = _with_quota(c.current, new_q)
                    target = replace(target, burst_us=target.quota_us or 0)
                    advice.append(
                        Advice(
                            c.cgroup,
                            self.name,
                            f"raise online (offline at floor): {why}",
                            cpu=target,
                        )
                    )
            elif loosen and c.current != c.baseline:
                advice.append(
                    Advice(c.cgroup, self.name, f"restore online spec: {why}", cpu=c.baseline)
                )
        return advice


@dataclass(frozen=True)
class CpuSpike(_Params):
    name: ClassVar[str] = "cpu_spike"
    threshold: float = 0.9
    """Online use above this fraction of its quota is a spike."""
    throttle_threshold: float = 0.2
    """Or: throttled in more than this fraction of CFS periods."""
    step_cores: float = 0.25
    ceiling_factor: float = 1.5

    def evaluate(self, snapshot: Snapshot) -> list[Advice]:
        advice = []
        for c in snapshot.by_priority("online"):
            q, base = c.current.quota_cores, c.baseline.quota_cores
            if q is None or base is None:
                continue
            ratio = c.cpu_cores / q
            throttled = c.metrics.throttled_ratio or 0.0
            if ratio > self.threshold or throttled > self.throttle_threshold:
                new_q = min(
                    base * self.ceiling_factor, snapshot.node.capacity_cores, q + self.step_cores
                )
                if new_q > q + 1e-9:
                    advice.append(
                        Advice(
                            c.cgroup,
                            self.name,
                            f"CPU spike: {ratio:.0%} of quota, throttled {throttled:.0%} of periods",
                            cpu=_with_quota(c.current, new_q),
                        )
                    )
        return advice


@dataclass(frozen=True)
class MemoryGuard(_Params):
    name: ClassVar[str] = "memory_guard"
    high_fraction: float = 0.9
    """Online working set above this fraction of its limit gets a larger limit."""
    grow_fraction: float = 0.25
    min_available_fraction: float = 0.1
    """Below this much node memory available, offline limits shrink toward their working set."""
    headroom_fraction: float = 0.1

    def evaluate(self, snapshot: Snapshot) -> list[Advice]:
        advice = []
        node = snapshot.node
        tight = node.memory_total_bytes and (
            node.memory_available_bytes / node.memory_total_bytes < self.min_available_fraction
        )
        for c in snapshot.containers:
            m = c.metrics
            if (
                c.priority == "online"
                and m.memory_limit_bytes
                and m.working_set_bytes > self.high_fraction * m.memory_limit_bytes
            ):
                new = int(m.memory_limit_bytes * (1 + self.grow_fraction))
                advice.append(
                    Advice(
                        c.cgroup,
                        self.name,
                        f"working set {m.working_set_bytes} B near limit",
                        memory_limit_bytes=new,
                    )
                )
            elif c.priority == "offline" and tight:
                floor = int(m.working_set_bytes * (1 + self.headroom_fraction))
                if m.memory_limit_bytes is None or m.memory_limit_bytes > floor:
                    advice.append(
                        Advice(
                            c.cgroup,
                            self.name,
                            "node memory low: cap offline at working set + headroom",
                            memory_limit_bytes=floor,
                        )
                    )
        return advice
