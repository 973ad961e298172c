"""``/metrics/cadvisor`` on a real pod: the kubelet's names and labels, CPU that grows for a
busy container and not for an idle one, the pod's limits, its netns counters."""

from __future__ import annotations

import os
import time
from email.message import Message
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.client import InstanceClient
from tidal.instance.spec import InstanceSpec, Limits, MemberSpec
from tidal.units import MiB

from .conftest import assert_nothing_left

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.netns]
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(d: Daemon, path: str = "/metrics/cadvisor") -> Series:
    resp = d.service.handle("GET", path, Message())
    assert resp.status == 200 and resp.content_type.startswith("text/plain")
    out: Series = {}
    for fam in text_string_to_metric_families(resp.body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def pick(series: Series, name: str, **want: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        labels: v
        for (n, labels), v in series.items()
        if n == name and all((k, w) in labels for k, w in want.items())
    }


def one(series: Series, name: str, **want: str) -> float:
    got = pick(series, name, **want)
    assert len(got) == 1, (name, want, got)
    return next(iter(got.values()))


def test_pod_and_container_series_under_cadvisor_names(
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    d, client = instance_daemon
    img = str(busybox_rootfs)
    rec = client.run_instance(
        InstanceSpec(
            image=img,
            command=("sh", "-c", "while :; do :; done"),
            name="busy",
            limits=Limits(cpus=0.5, memory_bytes=64 * MiB),
            labels=(("io.kubernetes.pod.name", "busy-pod"), ("io.kubernetes.pod.namespace", "ns1")),
            members=(MemberSpec("idle", img, ("sleep", "300")),),
        )
    )
    ids = {c["member"]: c["id"] for c in rec["containers"]}
    dd = "dd if=/dev/zero of=/dd.out bs=64k count=32 oflag=direct 2>&1 && sync"
    first = scrape(d)
    res = client.instance_exec("busy", ["sh", "-c", dd])
    assert res.exit_code == 0 and b"32+0 records out" in res.stdout, res.stdout
    time.sleep(1.5)
    second = scrape(d)
    cpu = "container_cpu_usage_seconds_total"
    pod = {"pod": "busy-pod", "namespace": "ns1"}
    busy0, busy1 = (
        one(first, cpu, container="main", **pod),
        one(second, cpu, container="main", **pod),
    )
    idle0, idle1 = (
        one(first, cpu, container="idle", **pod),
        one(second, cpu, container="idle", **pod),
    )
    assert busy1 - busy0 > 0.3, "a busy loop at 0.5 CPU for 1.5 s"
    assert idle1 - idle0 < 0.05, "sleep uses no CPU"
    assert one(second, cpu, container="", **pod) >= busy1, "the pod level holds its containers"
    # labels as cAdvisor gives them: id is the cgroup, name the container id, POD the sandbox
    main = next(iter(pick(second, cpu, container="main", **pod)))
    assert dict(main)["name"] == ids["main"] and dict(main)["image"] == img
    assert dict(main)["id"].endswith("/" + ids["main"]) and dict(main)["id"].startswith(
        "/" + rec["cgroup"]
    )
    level = dict(next(iter(pick(second, cpu, container="", **pod))))
    assert level["id"] == "/" + rec["cgroup"] and level["image"] == level["name"] == ""
    assert one(second, cpu, container="POD", **pod) >= 0
    # CFS figures where the quota applies (whether the loop is throttled depends on the CPU
    # the shared machine leaves it, so only the periods it ran in are certain)
    assert one(second, "container_cpu_cfs_periods_total", container="", **pod) > 0
    assert one(second, "container_cpu_cfs_throttled_seconds_total", container="", **pod) >= 0
    # block I/O per device, as v1 blkio counts it for the container's own cgroup (a device
    # appears once the cgroup did I/O on it; how much of dd's lands on which device, the
    # loop device of its layer or the disk below, varies with the kernel's paths)
    written = pick(second, "container_fs_writes_bytes_total", container="main", **pod)
    before = pick(first, "container_fs_writes_bytes_total", container="main", **pod)
    grew = {dict(k)["device"]: v - before.get(k, 0) for k, v in written.items()}
    assert any(v > 0 for v in grew.values()) and all(d.startswith("/dev/") for d in grew), grew
    assert one(second, "machine_cpu_cores") == os.cpu_count()
    # the pod's limits, and the memory figures
    assert one(second, "container_spec_cpu_quota", container="", **pod) == 50_000
    assert one(second, "container_spec_cpu_period", container="", **pod) == 100_000
    assert one(second, "container_spec_memory_limit_bytes", container="", **pod) == 64 * MiB
    ws = one(second, "container_memory_working_set_bytes", container="", **pod)
    usage = one(second, "container_memory_usage_bytes", container="", **pod)
    assert 0 < ws <= usage <= 64 * MiB
    started = one(second, "container_start_time_seconds", container="main", **pod)
    assert time.time() - 60 < started <= time.time()
    # the pod's netns, per interface, at pod level and on the sandbox (not on members)
    rx = pick(second, "container_network_receive_bytes_total", **pod)
    assert {(dict(k)["container"], dict(k)["interface"]) for k in rx} == {
        ("", "eth0"),
        ("POD", "eth0"),
    }
    assert pick(second, "container_network_transmit_bytes_total", container="", interface="eth0")
    # /metrics/resource, what metrics-server reads: pods and containers without the sandbox
    resp = d.service.handle("GET", "/metrics/resource", Message())
    res = scrape(d, "/metrics/resource")
    assert one(res, "pod_cpu_usage_seconds_total", **pod) >= busy1
    assert one(res, "pod_memory_working_set_bytes", **pod) > 0
    containers = {dict(k)["container"] for k in pick(res, cpu, **pod)}
    assert containers == {"main", "idle"}
    assert one(res, "node_cpu_usage_seconds_total") > one(res, "pod_cpu_usage_seconds_total", **pod)
    assert one(res, "node_memory_working_set_bytes") > 0 and one(res, "scrape_error") == 0
    stamped = [ln for ln in resp.body.decode().splitlines() if ln.startswith("pod_cpu")]
    assert stamped and all(len(ln.split()) == 3 for ln in stamped), "samples carry their time"
    client.remove_instance("busy", force=True)
    assert not pick(scrape(d), cpu, **pod), "a removed pod has no series"
    assert_nothing_left(engine_settings)
