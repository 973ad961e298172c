"""Values that flow through the command center: a frozen snapshot in, advice and events out.

Rules and policies are functions of a :class:`Snapshot` that return :class:`Advice`; they never
read cgroupfs or the clock themselves, so every decision can be replayed in a test or shown by
the API's dry-run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from tidal.cgroups import CpuLimits
from tidal.qos.collector import ContainerMetrics, NodeMetrics

Priority = Literal["online", "offline"]


@dataclass(frozen=True)
class ContainerView:
    """One watched cgroup as a policy sees it."""

    cgroup: str
    labels: dict[str, str]
    priority: Priority | None
    app: str | None
    metrics: ContainerMetrics
    baseline: CpuLimits
    """The declared spec: what the cgroup had before the agent touched it (restore target)."""
    cpu_ewma: float | None = None
    cpu_p95_1m: float | None = None

    @property
    def current(self) -> CpuLimits:
        return self.metrics.limits

    @property
    def cpu_cores(self) -> float:
        return self.metrics.cpu_cores or 0.0


@dataclass(frozen=True)
class Slo:
    app: str | None = None
    p95_latency_ms: float | None = None
    cpu_usage_ceiling: float | None = None
    """Alternative SLO: online CPU use as a fraction of its quota (or of the node) must stay below."""


@dataclass(frozen=True)
class Snapshot:
    t: float
    node: NodeMetrics
    containers: tuple[ContainerView, ...]
    slo: Slo
    latency_p95_ms: dict[str, float] = field(default_factory=dict)
    """Latest reported application p95 per app (fresh values only)."""

    def by_priority(self, priority: Priority) -> list[ContainerView]:
        return [c for c in self.containers if c.priority == priority]

    def online_latency_ms(self) -> float | None:
        if self.slo.app is not None:
            return self.latency_p95_ms.get(self.slo.app)
        return max(self.latency_p95_ms.values()) if self.latency_p95_ms else None


@dataclass(frozen=True)
class Advice:
    """A wish for one cgroup's values; the command center merges and the executor applies."""

    cgroup: str
    rule: str
    reason: str
    cpu: CpuLimits | None = None
    memory_limit_bytes: int | None = None
    """New memory limit; None means 'no memory change' (unlimited is never advised)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "cgroup": self.cgroup,
            "rule": self.rule,
            "reason": self.reason,
            "cpu": self.cpu.to_dict() if self.cpu else None,
            "memory_limit_bytes": self.memory_limit_bytes,
        }


EventKind = Literal["escalation", "scale_out", "rollback", "unhealthy", "rules", "adopt", "restore"]


@dataclass(frozen=True)
class Event:
    """A structured event for the API, the log and whoever scales the service (VPA, scheduler)."""

    kind: EventKind
    message: str
    subject: str = ""
    t: float = field(default_factory=time.time)
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "message": self.message,
            "t": self.t,
            "details": self.details,
        }
