"""Data collector: per-cgroup CPU, throttling, memory, PSI and per-node health signals.

Counters (CPU time, throttled time) are turned into rates between two consecutive samples,
so the first collection of a cgroup yields no rate. Node signals that decide whether the agent
may act at all (disk writable, a network interface up, samples fresh) are gathered here and
judged by :func:`judge_health`, a pure function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tidal.cgroups import (
    CgroupFs,
    CpuLimits,
    CpuStats,
    MemoryStats,
    Pressure,
    cpu_count,
    host_pressure,
)
from tidal.errors import CgroupError


@dataclass(frozen=True)
class ContainerMetrics:
    """One cgroup at one instant; rates are over the interval since the previous sample."""

    cgroup: str
    t: float
    cpu_cores: float | None
    """CPU used, in cores (1.0 = one CPU busy all the time); None on the first sample."""
    throttled_ratio: float | None
    """Fraction of CFS periods in which the group was throttled."""
    memory_usage_bytes: int
    working_set_bytes: int
    memory_limit_bytes: int | None
    limits: CpuLimits
    pressure: Pressure | None
    throttled_s_per_s: float | None = None
    """Seconds of throttled run time per second (summed over CPUs)."""


@dataclass(frozen=True)
class NodeMetrics:
    t: float
    capacity_cores: float
    cpu_busy_cores: float | None
    memory_total_bytes: int
    memory_available_bytes: int
    load1: float
    pressure: Pressure | None
    disk_ok: bool
    net_ok: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Frame:
    """Everything one collection round saw."""

    t: float
    node: NodeMetrics
    containers: dict[str, ContainerMetrics]
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ok: bool
    reasons: tuple[str, ...]


def judge_health(node: NodeMetrics | None, now: float, stale_after_s: float) -> Health:
    """Protect the scene: any disk, network or collector fault means 'change nothing'."""
    if node is None:
        return Health(False, ("collector has produced no sample yet",))
    reasons = list(node.problems)
    age = now - node.t
    if age > stale_after_s:
        reasons.append(f"collector stale: last sample {age:.1f}s old (limit {stale_after_s:.1f}s)")
    return Health(not reasons, tuple(reasons))


class NodeProbe:
    """Reads node-wide signals from procfs/sysfs; paths are parameters so tests can fake them."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
        disk_probe_dir: Path | None = None,
        required_interfaces: tuple[str, ...] = (),
    ) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.disk_probe_dir = disk_probe_dir
        self.required_interfaces = required_interfaces
        self._last_cpu: tuple[float, int, int] | None = None

    def _cpu_busy(self, now: float) -> float | None:
        fields = (self.proc_root / "stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total = sum(ticks[:8])
        prev, self._last_cpu = self._last_cpu, (now, total, idle)
        if prev is None or total == prev[1]:
            return None
        busy_frac = 1 - (idle - prev[2]) / (total - prev[1])
        return max(0.0, busy_frac) * cpu_count()

    def _meminfo(self) -> tuple[int, int]:
        info: dict[str, int] = {}
        for line in (self.proc_root / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                info[key] = int(parts[0]) * 1024
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))

    def _disk_problem(self) -> str | None:
        if self.disk_probe_dir is None:
            return None
        probe = self.disk_probe_dir / ".qos-disk-probe"
        try:
            self.disk_probe_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"disk fault: cannot write {probe}: {exc.strerror or exc}"
        return None

    def _net_problem(self) -> str | None:
        net = self.sys_root / "class" / "net"
        try:
            states = {p.name: (p / "operstate").read_text().strip() for p in net.iterdir()}
        except OSError as exc:
            return f"network state unreadable at {net}: {exc.strerror or exc}"
        for name in self.required_interfaces:
            if states.get(name) not in ("up", "unknown"):
                return f"network down: interface {name} is {states.get(name, 'missing')}"
        if not self.required_interfaces and not any(
            s == "up" for n, s in states.items() if n != "lo"
        ):
            return "network down: no interface besides lo is up"
        return None

    def sample(self, now: float) -> NodeMetrics:
        total, available = self._meminfo()
        load1 = float((self.proc_root / "loadavg").read_text().split()[0])
        disk, net = self._disk_problem(), self._net_problem()
        return NodeMetrics(
            t=now,
            capacity_cores=float(cpu_count()),
            cpu_busy_cores=self._cpu_busy(now),
            memory_total_bytes=total,
            memory_available_bytes=available,
            load1=load1,
            pressure=host_pressure(self.proc_root),
            disk_ok=disk is None,
            net_ok=net is None,
            problems=tuple(p for p in (disk, net) if p),
        )


class NodeSource(Protocol):
    def sample(self, now: float) -> NodeMetrics: ...


class Collector:
    """Samples a set of cgroups and the node; keeps the previous counters to compute rates."""

    def __init__(
        self,
        fs: CgroupFs,
        node_probe: NodeSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fs = fs
        self.node_probe = node_probe or NodeProbe()
        self.clock = clock
        self._prev: dict[str, tuple[float, CpuStats]] = {}
        self.last_frame: Frame | None = None

    def _container(self, cgroup: str, now: float) -> ContainerMetrics:
        cpu = self.fs.cpu_stats(cgroup)
        mem: MemoryStats = self.fs.memory_stats(cgroup)
        prev = self._prev.get(cgroup)
        self._prev[cgroup] = (now, cpu)
        cores: float | None = None
        throttled: float | None = None
        throttled_time: float | None = None
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            cores = max(0.0, (cpu.usage_ns - prev[1].usage_ns) / 1e9 / dt)
            periods = cpu.nr_periods - prev[1].nr_periods
            throttled = (cpu.nr_throttled - prev[1].nr_throttled) / periods if periods > 0 else 0.0
            throttled_time = max(0.0, (cpu.throttled_ns - prev[1].throttled_ns) / 1e9 / dt)
        return ContainerMetrics(
            cgroup=cgroup,
            t=now,
            cpu_cores=cores,
            throttled_ratio=throttled,
            memory_usage_bytes=mem.usage_bytes,
            working_set_bytes=mem.working_set_bytes,
            memory_limit_bytes=mem.limit_bytes,
            limits=self.fs.read_cpu(cgroup),
            pressure=self.fs.pressure(cgroup),
            throttled_s_per_s=throttled_time,
        )

    def collect(self, cgroups: Iterable[str]) -> Frame:
        now = self.clock()
        containers: dict[str, ContainerMetrics] = {}
        errors: dict[str, str] = {}
        for cg in cgroups:
            try:
                containers[cg] = self._container(cg, now)
            except CgroupError as exc:
                errors[cg] = str(exc)
                self._prev.pop(cg, None)
        frame = Frame(now, self.node_probe.sample(now), containers, errors)
        self.last_frame = frame
        return frame
