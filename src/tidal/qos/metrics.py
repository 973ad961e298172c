"""Prometheus metrics of the agent: usage, throttling, adjustments, SLO attainment.

One registry per agent (not the global default), so that tests and several agents in one
process never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tidal.qos.collector import Frame


class QosMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cpu = Gauge(
            "tidal_qos_cpu_cores", "CPU used by the cgroup, in cores", ["cgroup"], registry=r
        )
        self.throttled = Gauge(
            "tidal_qos_throttled_ratio", "Fraction of CFS periods throttled", ["cgroup"], registry=r
        )
        self.throttled_time = Gauge(
            "tidal_qos_throttled_seconds_per_second",
            "Throttled run time per second",
            ["cgroup"],
            registry=r,
        )
        self.working_set = Gauge(
            "tidal_qos_memory_working_set_bytes", "Memory working set", ["cgroup"], registry=r
        )
        self.quota = Gauge(
            "tidal_qos_cpu_quota_cores",
            "CFS quota in cores (-1 = unlimited)",
            ["cgroup"],
            registry=r,
        )
        self.shares = Gauge(
            "tidal_qos_cpu_shares",
            "cpu.shares (v1) or the equivalent of cpu.weight",
            ["cgroup"],
            registry=r,
        )
        self.adjustments = Counter(
            "tidal_qos_adjustments", "Cgroup changes attempted", ["cgroup", "result"], registry=r
        )
        self.events = Counter("tidal_qos_events", "Events raised", ["kind"], registry=r)
        self.healthy = Gauge(
            "tidal_qos_node_healthy", "1 when the node is healthy enough to adjust", registry=r
        )
        self.node_busy = Gauge(
            "tidal_qos_node_cpu_busy_cores", "Node CPU busy, in cores", registry=r
        )
        self.latency = Gauge(
            "tidal_qos_latency_p95_ms", "Reported application p95 latency", ["app"], registry=r
        )
        self.attainment = Gauge(
            "tidal_qos_slo_attainment_ratio",
            "Fraction of recent rounds inside the SLO",
            ["app"],
            registry=r,
        )

    def observe_frame(self, frame: Frame) -> None:
        for cg, m in frame.containers.items():
            if m.cpu_cores is not None:
                self.cpu.labels(cg).set(m.cpu_cores)
            if m.throttled_ratio is not None:
                self.throttled.labels(cg).set(m.throttled_ratio)
            if m.throttled_s_per_s is not None:
                self.throttled_time.labels(cg).set(m.throttled_s_per_s)
            self.working_set.labels(cg).set(m.working_set_bytes)
            q = m.limits.quota_cores
            self.quota.labels(cg).set(-1 if q is None else q)
            self.shares.labels(cg).set(m.limits.shares)
        if frame.node.cpu_busy_cores is not None:
            self.node_busy.set(frame.node.cpu_busy_cores)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
