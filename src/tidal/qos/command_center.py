"""Command center: health guard, rules, merge of advice, drift guard and escalations.

Order of a round, as the seed describes it: check node health first (a disk or network fault,
or a stale collector, means protect the scene and change nothing); run the policy and rules on
the frozen snapshot; merge their advice per cgroup (offline: the strictest wins; online: the
most generous wins; memory never below current use); hand the targets to the executor. Then
the guards: a value kept away from the declared spec for longer than ``drift_limit_s`` raises
an ``escalation`` event (to a vertical autoscaler), an SLO that stays broken while there is
nothing left to squeeze raises ``scale_out`` (to the scheduler).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tidal.cgroups import CpuLimits
from tidal.errors import QosError
from tidal.qos.collector import Health
from tidal.qos.executor import Adjustment, Executor, Values
from tidal.qos.rules import RuleSet
from tidal.qos.snapshot import Advice, ContainerView, Event, Snapshot

log = logging.getLogger(__name__)
EVENT_HISTORY = 500


@dataclass(frozen=True)
class Target:
    cgroup: str
    before: Values
    after: Values
    rules: tuple[str, ...]
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "cgroup": self.cgroup,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "rules": list(self.rules),
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Decision:
    health: Health
    advice: tuple[Advice, ...] = ()
    targets: tuple[Target, ...] = ()
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "healthy": self.health.ok,
            "health_reasons": list(self.health.reasons),
            "note": self.note,
            "advice": [a.to_dict() for a in self.advice],
            "targets": [t.to_dict() for t in self.targets],
        }


def _q(limits: CpuLimits) -> float:
    return float("inf") if limits.quota_us is None else limits.quota_us / limits.period_us


def _combine(a: CpuLimits, b: CpuLimits, strict: bool) -> CpuLimits:
    """Two wishes for one group: the stricter (offline) or the more generous (online) of each knob."""
    pick = min if strict else max
    qa, qb = _q(a), _q(b)
    chosen = a if pick(qa, qb) == qa else b
    return replace(
        chosen,
        shares=pick(a.shares, b.shares),
        burst_us=pick(a.burst_us, b.burst_us),
        idle=(a.idle or b.idle) if strict else (a.idle and b.idle),
    )


def merge_advice(snapshot: Snapshot, advice: list[Advice]) -> list[Target]:
    """Fold all advice into one target per cgroup (pure; the dry-run shows exactly this)."""
    views: dict[str, ContainerView] = {c.cgroup: c for c in snapshot.containers}
    acc: dict[str, tuple[CpuLimits | None, int | None, list[str], list[str]]] = {}
    for a in advice:
        view = views.get(a.cgroup)
        if view is None:
            continue
        cpu, mem, rules, reasons = acc.get(a.cgroup, (None, None, [], []))
        strict = view.priority == "offline"
        if a.cpu is not None:
            cpu = a.cpu if cpu is None else _combine(cpu, a.cpu, strict)
        if a.memory_limit_bytes is not None:
            pick = min if strict else max
            mem = a.memory_limit_bytes if mem is None else pick(mem, a.memory_limit_bytes)
        acc[a.cgroup] = (cpu, mem, [*rules, a.rule], [*reasons, a.reason])
    targets = []
    for cg, (cpu, mem, rules, reasons) in acc.items():
        m = views[cg].metrics
        before = Values(m.limits, m.memory_limit_bytes)
        if mem is not None:
            mem = max(mem, m.memory_usage_bytes)  # never below use: that is an OOM kill
        after = Values(cpu or m.limits, mem if mem is not None else m.memory_limit_bytes)
        if after != before:
            targets.append(Target(cg, before, after, tuple(dict.fromkeys(rules)), tuple(reasons)))
    return targets


@dataclass
class _GuardState:
    drift_since: dict[str, float] = field(default_factory=dict)
    escalated: set[str] = field(default_factory=set)
    overload_since: float | None = None
    scaled_out: bool = False


class CommandCenter:
    def __init__(self, executor: Executor, on_event: Callable[[Event], None] | None = None) -> None:
        self.executor = executor
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self.on_event = on_event
        self._guards = _GuardState()
        self.last_decision: Decision | None = None

    def emit(self, event: Event) -> None:
        self.events.append(event)
        log.warning("qos event %s %s: %s", event.kind, event.subject, event.message)
        if self.on_event:
            self.on_event(event)

    def decide(self, snapshot: Snapshot, rules: RuleSet, health: Health) -> Decision:
        if not health.ok:
            return Decision(health, note="node unhealthy: protecting the scene, no adjustment")
        advice = [a for rule in rules.all_rules() for a in rule.evaluate(snapshot)]
        return Decision(health, tuple(advice), tuple(merge_advice(snapshot, advice)))

    def act(self, decision: Decision) -> list[Adjustment]:
        done = []
        for t in decision.targets:
            try:
                done.append(
                    self.executor.apply(t.cgroup, t.after, "+".join(t.rules), "; ".join(t.reasons))
                )
            except QosError as exc:  # rolled back (AdjustmentError) or unreadable group
                self.emit(Event("rollback", str(exc), t.cgroup))
        return done

    def round(self, snapshot: Snapshot, rules: RuleSet, health: Health) -> Decision:
        prev_ok = self.last_decision.health.ok if self.last_decision else True
        decision = self.decide(snapshot, rules, health)
        if not health.ok and prev_ok:
            self.emit(Event("unhealthy", "; ".join(health.reasons), "node"))
        self.last_decision = decision
        self.act(decision)
        self.guard(snapshot, rules)
        return decision

    def guard(self, snapshot: Snapshot, rules: RuleSet) -> None:
        """Drift guard per cgroup and the node-level scale-out escalation."""
        g = self._guards
        now = snapshot.t
        for c in snapshot.containers:
            drifted = self.executor.fs.normalize(c.current) != self.executor.fs.normalize(
                c.baseline
            )
            if not drifted:
                g.drift_since.pop(c.cgroup, None)
                g.escalated.discard(c.cgroup)
                continue
            since = g.drift_since.setdefault(c.cgroup, now)
            if now - since >= rules.guards.drift_limit_s and c.cgroup not in g.escalated:
                g.escalated.add(c.cgroup)
                self.emit(
                    Event(
                        "escalation",
                        f"cgroup {c.cgroup} has run {now - since:.0f}s away from its declared "
                        f"spec; resize it (vertical autoscaler) instead of node-level tuning",
                        c.cgroup,
                        details={
                            "current": c.current.to_dict(),
                            "spec": c.baseline.to_dict(),
                            "priority": c.priority,
                        },
                    )
                )
        latency, slo = snapshot.online_latency_ms(), snapshot.slo.p95_latency_ms
        violated = latency is not None and slo is not None and latency > slo
        if not violated:
            g.overload_since, g.scaled_out = None, False
            return
        if g.overload_since is None:
            g.overload_since = now
        if now - g.overload_since >= rules.guards.scale_out_after_s and not g.scaled_out:
            g.scaled_out = True
            self.emit(
                Event(
                    "scale_out",
                    f"online p95 {latency:.0f} ms has exceeded the {slo:g} ms SLO for "
                    f"{now - g.overload_since:.0f}s despite node-level adjustment; add replicas elsewhere",
                    snapshot.slo.app or "online",
                    details={
                        "p95_ms": latency,
                        "slo_ms": slo,
                        "node_busy_cores": snapshot.node.cpu_busy_cores,
                    },
                )
            )
