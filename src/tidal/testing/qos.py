"""Fakes for the QoS agent: node signals set by the test."""

from __future__ import annotations

from tidal.qos.collector import NodeMetrics


class FakeNodeProbe:
    """Node signals set by the test: capacity, busy cores, memory, and disk/network faults."""

    def __init__(self, capacity_cores: float = 2.0) -> None:
        self.capacity_cores = capacity_cores
        self.busy_cores: float | None = 0.5
        self.memory_total_bytes = 8 << 30
        self.memory_available_bytes = 4 << 30
        self.problems: list[str] = []

    def sample(self, now: float) -> NodeMetrics:
        return NodeMetrics(
            t=now,
            capacity_cores=self.capacity_cores,
            cpu_busy_cores=self.busy_cores,
            memory_total_bytes=self.memory_total_bytes,
            memory_available_bytes=self.memory_available_bytes,
            load1=0.0,
            pressure=None,
            disk_ok=not any(p.startswith("disk") for p in self.problems),
            net_ok=not any(p.startswith("network") for p in self.problems),
            problems=tuple(self.problems),
        )
