"""Per-instance and per-container metrics under the kubelet's cAdvisor names and labels.

``GET /metrics/cadvisor`` on the engine daemon (and on its ``--metrics-listen`` port) answers
what the kubelet's ``/metrics/cadvisor`` answers for a pod on an owned node, so dashboards,
alerts and the HPA's queries work on Tidal's instances unchanged:

- labels ``container``, ``id`` (the cgroup path), ``image``, ``name`` (the container's id, as
  cAdvisor names containerd's), ``namespace``, ``pod``; the pod-level series (the pod's own
  cgroup) have ``container=""``, ``image=""``, ``name=""``, the sandbox is ``container="POD"``
  (a runc pod's sandbox runs no process: its series are its empty cgroup's, ~0 as a pause
  container's are); pod identity from :mod:`tidal.instance.identity`;
- ``machine_cpu_cores``, ``machine_memory_bytes`` (what dashboards divide by);
- ``container_cpu_usage_seconds_total``, ``container_cpu_cfs_{periods,throttled_periods,
  throttled_seconds}_total`` (where a quota applies), ``container_memory_usage_bytes``,
  ``container_memory_working_set_bytes`` (usage less inactive file pages, the kubelet's
  eviction figure), ``container_spec_cpu_quota``/``_period``/``_shares``,
  ``container_spec_memory_limit_bytes`` (0: unlimited), ``container_start_time_seconds``;
- ``container_network_{receive,transmit}_{bytes,packets,errors,packets_dropped}_total`` per
  ``interface`` of the pod's network namespace (loopback left out, as cAdvisor does), on the
  pod-level series and the sandbox's, as cAdvisor reports a pod's netns;
- ``container_fs_{reads,writes}_bytes_total`` and ``container_fs_{reads,writes}_total`` per
  ``device`` where the cgroup's block I/O is counted (v1 blkio, v2 io.stat).

Engine containers outside an instance are reported too, as cAdvisor does for every cgroup:
``pod=""``, ``namespace=""``, ``container`` their engine name.

A prometheus-client collector that reads the cgroups and ``/proc/<pid>/net/dev`` when
scraped: no thread polls, and a scrape costs a few file reads per container.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidal.cgroups import CgroupFs, detect_cgroupfs
from tidal.errors import TidalError
from tidal.instance.identity import SANDBOX_CONTAINER, PodIdentity, container_name
from tidal.instance.manager import LABEL_ID
from tidal.instance.store import SANDBOX
from tidal.service.server import Response, Route

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from tidal.engine.store import ContainerRecord
    from tidal.instance.manager import InstanceManager

log = logging.getLogger(__name__)
LABELS = ("container", "id", "image", "name", "namespace", "pod")
IGNORED_INTERFACES = frozenset({"lo"})
NET_FIELDS = (
    # /proc/net/dev columns after the interface name, and the cAdvisor name of each kept one
    ("receive_bytes", 0),
    ("receive_packets", 1),
    ("receive_errors", 2),
    ("receive_packets_dropped", 3),
    ("transmit_bytes", 8),
    ("transmit_packets", 9),
    ("transmit_errors", 10),
    ("transmit_packets_dropped", 11),
)


@dataclass(frozen=True)
class Target:
    """One cgroup to report: its labels, and where its netns counters are (a pid in it)."""

    labels: tuple[str, str, str, str, str, str]
    cgroup: str
    started_at: float | None
    net_pid: int = 0


def parse_net_dev(text: str) -> dict[str, tuple[int, ...]]:
    """``/proc/<pid>/net/dev`` -> interface -> its 16 counters (loopback left out)."""
    out: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or name in IGNORED_INTERFACES:
            continue
        values = rest.split()
        if len(values) >= 16 and all(v.isdigit() for v in values):
            out[name] = tuple(int(v) for v in values)
    return out


def device_name(dev: str, sys_root: Path = Path("/sys")) -> str:
    """``7:11`` -> ``/dev/loop11`` (cAdvisor's ``device`` label), else ``dev`` itself."""
    try:
        for line in (sys_root / "dev" / "block" / dev / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return "/dev/" + line.removeprefix("DEVNAME=")
    except OSError:
        pass
    return dev


class CadvisorCollector:
    """Reads every live instance's and container's cgroup when scraped."""

    def __init__(self, manager: InstanceManager, fs: CgroupFs | None = None) -> None:
        self.manager = manager
        self._fs = fs
        self.proc_root = Path("/proc")
        self._machine: tuple[tuple[str, ...], int, int] | None = None

    @property
    def fs(self) -> CgroupFs:
        if self._fs is None:
            self._fs = detect_cgroupfs(self.manager.engine.cgroup_root)
        return self._fs

    def targets(self) -> Iterator[Target]:
        """The live pods (their cgroup, then each running container's) and the engine's other
        running containers, from one listing of the engine's records."""
        engine = self.manager.engine
        by_name = {c.name: c for c in engine.list_all()}
        seen: set[str] = set()
        for rec in self.manager.list_all():
            if rec.phase != "running":
                continue
            who = PodIdentity.of(rec)
            members: list[tuple[str, ContainerRecord]] = []
            for member in rec.member_names():
                crec = by_name.get(rec.container_name(member))
                if crec is None:
                    continue
                seen.add(crec.id)
                # a runc pod's sandbox is only created (no process: InstanceManager.sandbox_runs);
                # its POD series are its empty cgroup's and the pod's netns counters all the same
                if crec.status == "running" or (member == SANDBOX and crec.status == "created"):
                    members.append(
                        (
                            SANDBOX_CONTAINER if member == SANDBOX else container_name(rec, member),
                            crec,
                        )
                    )
            if not any(c.status == "running" for _, c in members):
                continue
            # any process in the pod's netns reads its counters: the sandbox's, else a member's
            net_pid = next(
                (
                    c.pid
                    for m, c in sorted(members, key=lambda x: x[0] != SANDBOX_CONTAINER)
                    if c.pid
                ),
                0,
            )
            yield Target(
                ("", "/" + rec.cgroup, "", "", who.namespace, who.pod),
                rec.cgroup,
                rec.created_at,
                net_pid,
            )
            for member, crec in members:
                cgroup = engine.cgroups_path_of(crec)
                yield Target(
                    (member, cgroup, crec.spec.image, crec.id, who.namespace, who.pod),
                    cgroup,
                    crec.started_at or crec.created_at,
                    net_pid if member == SANDBOX_CONTAINER else 0,
                )
        for crec in by_name.values():
            if crec.id in seen or crec.status != "running" or LABEL_ID in dict(crec.spec.labels):
                continue
            cgroup = engine.cgroups_path_of(crec)
            net = crec.pid if crec.spec.network == "bridge" else 0
            labels = (crec.name, cgroup, crec.spec.image, crec.id, "", "")
            yield Target(labels, cgroup, crec.started_at, net)

    def machine(self) -> Iterator[Metric]:
        """``machine_cpu_cores`` and ``machine_memory_bytes``, which dashboards divide by,
        labelled as cAdvisor labels them (``boot_id``, ``machine_id``, ``system_uuid``)."""
        from prometheus_client.core import GaugeMetricFamily

        if self._machine is None:
            ids = []
            for path in (
                "/proc/sys/kernel/random/boot_id",
                "/etc/machine-id",
                "/sys/class/dmi/id/product_uuid",
            ):
                try:
                    ids.append(Path(path).read_text().strip())
                except OSError:
                    ids.append("")
            mem = 0
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in (self.proc_root / "meminfo").read_text().splitlines():
                    if line.startswith("MemTotal:"):
                        mem = int(line.split()[1]) * 1024
            self._machine = (tuple(ids), os.cpu_count() or 0, mem)
        ids_t, cores, mem = self._machine
        names = ["boot_id", "machine_id", "system_uuid"]
        for name, doc, value in (
            ("machine_cpu_cores", "Number of logical CPU cores.", cores),
            ("machine_memory_bytes", "Amount of memory installed on the machine.", mem),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(list(ids_t), value)
            yield family

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*LABELS, *extra])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(LABELS))

        cpu = counter(
            "container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds."
        )
        periods = counter(
            "container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals."
        )
        throttled = counter(
            "container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals."
        )
        throttled_s = counter(
            "container_cpu_cfs_throttled_seconds_total",
            "Total time duration the container has been throttled.",
        )
        mem = gauge(
            "container_memory_usage_bytes",
            "Current memory usage in bytes, including all memory regardless of when it was accessed",
        )
        wss = gauge("container_memory_working_set_bytes", "Current working set in bytes.")
        mem_limit = gauge("container_spec_memory_limit_bytes", "Memory limit for the container.")
        quota = gauge("container_spec_cpu_quota", "CPU quota of the container.")
        period = gauge("container_spec_cpu_period", "CPU period of the container.")
        shares = gauge("container_spec_cpu_shares", "CPU share of the container.")
        start = gauge(
            "container_start_time_seconds",
            "Start time of the container since unix epoch in seconds.",
        )
        net = {
            field: counter(
                f"container_network_{field}_total",
                f"Cumulative count of {field.replace('_', ' ')}",
                ("interface",),
            )
            for field, _ in NET_FIELDS
        }
        fs_rows = {
            "reads_bytes": counter(
                "container_fs_reads_bytes_total", "Cumulative count of bytes read", ("device",)
            ),
            "writes_bytes": counter(
                "container_fs_writes_bytes_total", "Cumulative count of bytes written", ("device",)
            ),
            "reads": counter(
                "container_fs_reads_total", "Cumulative count of reads completed", ("device",)
            ),
            "writes": counter(
                "container_fs_writes_total", "Cumulative count of writes completed", ("device",)
            ),
        }
        fs = self.fs
        for t in self.targets():
            labels = list(t.labels)
            try:
                cpu_stats = fs.cpu_stats(t.cgroup)
                limits = fs.read_cpu(t.cgroup)
                memory = fs.memory_stats(t.cgroup)
                io = fs.io_stats(t.cgroup)
            except (TidalError, OSError, ValueError) as exc:  # exited between list and read
                log.debug("cadvisor: skipping %s: %s", t.cgroup, exc)
                continue
            cpu.add_metric(labels, cpu_stats.usage_ns / 1e9)
            mem.add_metric(labels, memory.usage_bytes)
            wss.add_metric(labels, memory.working_set_bytes)
            mem_limit.add_metric(labels, memory.limit_bytes or 0)
            if limits.quota_us is not None:  # CFS figures: only where a quota applies
                quota.add_metric(labels, limits.quota_us)
                periods.add_metric(labels, cpu_stats.nr_periods)
                throttled.add_metric(labels, cpu_stats.nr_throttled)
                throttled_s.add_metric(labels, cpu_stats.throttled_ns / 1e9)
            period.add_metric(labels, limits.period_us)
            shares.add_metric(labels, limits.shares)
            if t.started_at:
                start.add_metric(labels, t.started_at)
            for dev, st in sorted(io.items()):
                where = [*labels, device_name(dev)]
                fs_rows["reads_bytes"].add_metric(where, st.read_bytes)
                fs_rows["writes_bytes"].add_metric(where, st.write_bytes)
                fs_rows["reads"].add_metric(where, st.reads)
                fs_rows["writes"].add_metric(where, st.writes)
            if t.net_pid:
                try:
                    ifaces = parse_net_dev(
                        (self.proc_root / str(t.net_pid) / "net" / "dev").read_text()
                    )
                except OSError:
                    ifaces = {}
                for iface, values in sorted(ifaces.items()):
                    for field, col in NET_FIELDS:
                        net[field].add_metric([*labels, iface], values[col])
        yield from self.machine()
        yield from (
            cpu,
            periods,
            throttled,
            throttled_s,
            mem,
            wss,
            mem_limit,
            quota,
            period,
            shares,
            start,
            *net.values(),
            *fs_rows.values(),
        )


class ResourceCollector:
    """The kubelet's ``/metrics/resource`` (what metrics-server scrapes for ``kubectl top``
    and the HPA): ``node_``, ``pod_`` and ``container_cpu_usage_seconds_total`` and
    ``..._memory_working_set_bytes``, ``container_start_time_seconds`` and ``scrape_error``,
    labelled ``namespace``, ``pod`` (and ``container``), the sandbox left out as the kubelet
    does, from the same cgroup reads as :class:`CadvisorCollector`. Every sample carries the
    time it was read, as the kubelet's do (metrics-server takes its windows from them)."""

    def __init__(self, cadvisor: CadvisorCollector) -> None:
        self.cadvisor = cadvisor

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fs = self.cadvisor.fs
        error = 0
        now = time.time()
        node_cpu = CounterMetricFamily(
            "node_cpu_usage_seconds_total",
            "Cumulative cpu time consumed by the node in core-seconds",
        )
        node_mem = GaugeMetricFamily(
            "node_memory_working_set_bytes", "Current working set of the node in bytes"
        )
        try:
            node_cpu.add_metric([], fs.cpu_stats("/").usage_ns / 1e9, timestamp=now)
            node_mem.add_metric([], fs.memory_stats("/").working_set_bytes, timestamp=now)
        except (TidalError, OSError, ValueError):
            error = 1
        pod_labels, ctr_labels = ["namespace", "pod"], ["container", "namespace", "pod"]
        pod_cpu = CounterMetricFamily(
            "pod_cpu_usage_seconds_total",
            "Cumulative cpu time consumed by the pod in core-seconds",
            labels=pod_labels,
        )
        pod_mem = GaugeMetricFamily(
            "pod_memory_working_set_bytes",
            "Current working set of the pod in bytes",
            labels=pod_labels,
        )
        ctr_cpu = CounterMetricFamily(
            "container_cpu_usage_seconds_total",
            "Cumulative cpu time consumed by the container in core-seconds",
            labels=ctr_labels,
        )
        ctr_mem = GaugeMetricFamily(
            "container_memory_working_set_bytes",
            "Current working set of the container in bytes",
            labels=ctr_labels,
        )
        ctr_start = GaugeMetricFamily(
            "container_start_time_seconds",
            "Start time of the container since unix epoch in seconds",
            labels=ctr_labels,
        )
        for t in self.cadvisor.targets():
            container, _, _, _, namespace, pod = t.labels
            if not pod or container == SANDBOX_CONTAINER:
                continue
            now = time.time()
            try:
                usage_s = fs.cpu_stats(t.cgroup).usage_ns / 1e9
                working_set = fs.memory_stats(t.cgroup).working_set_bytes
            except (TidalError, OSError, ValueError):  # exited between list and read
                continue
            if not container:
                pod_cpu.add_metric([namespace, pod], usage_s, timestamp=now)
                pod_mem.add_metric([namespace, pod], working_set, timestamp=now)
                continue
            ctr_cpu.add_metric([container, namespace, pod], usage_s, timestamp=now)
            ctr_mem.add_metric([container, namespace, pod], working_set, timestamp=now)
            if t.started_at:
                ctr_start.add_metric([container, namespace, pod], t.started_at, timestamp=now)
        scrape = GaugeMetricFamily(
            "scrape_error", "1 if there was an error while getting container metrics, 0 otherwise"
        )
        scrape.add_metric([], error, timestamp=now)
        yield from (node_cpu, node_mem, pod_cpu, pod_mem, ctr_cpu, ctr_mem, ctr_start, scrape)


def metrics_routes(manager: InstanceManager) -> list[Route]:
    """``GET /metrics/cadvisor`` and ``GET /metrics/resource``, each from its own registry
    (the service's ``/metrics`` keeps Tidal's own figures, as the kubelet keeps its three
    endpoints apart)."""
    cadvisor = CadvisorCollector(manager)
    registries: dict[str, Any] = {}
    lock = threading.Lock()

    def serve(which: str) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        with lock:
            if which not in registries:
                registries[which] = CollectorRegistry(auto_describe=False)
                collector = cadvisor if which == "cadvisor" else ResourceCollector(cadvisor)
                registries[which].register(collector)
        return Response(generate_latest(registries[which]), 200, CONTENT_TYPE_LATEST)

    return [
        Route("GET", "/metrics/cadvisor", lambda _: serve("cadvisor"), "metrics_cadvisor"),
        Route("GET", "/metrics/resource", lambda _: serve("resource"), "metrics_resource"),
    ]
