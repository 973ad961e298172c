"""Warm pools on the host: a hit hands out a made sandbox (netns, veth, tc, cgroup, namespace
files) and starts only the members; a released sandbox is cleaned and serves the next
instance with nothing of the last one visible; the API prewarms, reports and drains."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon
from tidal.engine.network import host_link, in_netns, netns_path
from tidal.engine.settings import EngineSettings
from tidal.engine.spec import PortMapping
from tidal.errors import TidalError
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.manager import InstanceManager
from tidal.instance.service import instance_part
from tidal.instance.spec import InstanceSpec, Limits, MemberSpec
from tidal.units import MiB

from .conftest import assert_nothing_left, cleanup_engine, pod_cgroups

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.netns,
    pytest.mark.loop,
]
SHAPE = Limits(cpus=0.5, memory_bytes=64 * MiB, egress_bps=20_000_000, ingress_bps=30_000_000)


def _sh(mgr: InstanceManager, ref: str, script: str, container: str | None = None) -> str:
    res = mgr.exec(ref, ["sh", "-c", script], container=container)
    assert res.exit_code == 0, (script, res.stdout, res.stderr)
    return res.stdout.decode()


def _tc(dev: str, netns: str | None = None) -> str:
    """``netns``: a container id, whose network namespace the holder keeps."""
    argv = [*(in_netns(netns_path(netns)) if netns else []), "tc", "qdisc", "show", "dev", dev]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def pooled(engine_settings: EngineSettings) -> Iterator[InstanceManager]:
    """A manager with pools on and no refill thread: every member is made by prewarm or
    returned by rm, so the test decides what is in the pool."""
    engine = Engine(engine_settings)
    mgr = InstanceManager(engine, InstanceSettings(pool_max=2))
    try:
        yield mgr
    finally:
        try:
            for rec in mgr.list_all():
                mgr.remove(rec.id, force=True)
            mgr.pools.drain()
        finally:
            cleanup_engine(engine)


def test_a_hit_hands_out_the_warm_sandbox_and_starts_only_the_members(
    pooled: InstanceManager, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    mgr = pooled
    spec = InstanceSpec(image=str(busybox_rootfs), command=("sleep", "300"), limits=SHAPE)
    status = mgr.prewarm(spec, 1)
    assert (status["ready"], status["target"]) == (1, 1)
    (warm,) = mgr.pool_store.list()
    assert warm.phase == "ready" and warm.sandbox_id
    host_dev = host_link(warm.sandbox_id)
    assert "rate 30Mbit" in _tc(host_dev)  # shaped before any instance asked for it
    rec = mgr.run(
        InstanceSpec(
            image=str(busybox_rootfs),
            command=("sleep", "300"),
            name="hit",
            limits=SHAPE,
            members=(MemberSpec("side", str(busybox_rootfs), ("sleep", "300")),),
        )
    )
    assert rec.sandbox_id == warm.sandbox_id and rec.pool_member == warm.id
    assert rec.cgroup == warm.cgroup and rec.ip == warm.ip
    phases = [p for p, _ in rec.timings]
    assert phases == ["record", "create", "limits", "start", "total"], (
        phases
    )  # no cgroup, no sandbox
    assert mgr.pool_store.list() == []  # the instance's record owns the member now
    d = mgr.describe(rec)
    assert [c["member"] for c in d["containers"]] == ["sandbox", "main", "side"]
    assert d["containers"][0]["id"] == warm.sandbox_id and d["timings"]["total"] > 0
    assert d["status"] == "running"
    for member in ("main", "side"):
        out = _sh(mgr, "hit", "hostname; cat /etc/hosts", member).splitlines()
        assert out[0] == "hit" and f"{rec.ip}\thit" in out
    assert "rate 20Mbit" in _tc("eth0", warm.sandbox_id)
    memory = Path("/sys/fs/cgroup/memory") / rec.cgroup
    if memory.is_dir():
        assert int((memory / "memory.limit_in_bytes").read_text()) == 64 * MiB
        kids = {p.name for p in memory.iterdir() if p.is_dir()}
        assert kids == {c["id"] for c in d["containers"]}
    # a spec that publishes ports bypasses the pools
    assert not mgr._poolable(dataclasses.replace(spec, ports=(PortMapping(18080, 80),)))
    mgr.remove("hit", force=True)
    mgr.pools.drain()
    assert_nothing_left(engine_settings)


def test_a_released_sandbox_is_cleaned_and_serves_the_next_instance(
    pooled: InstanceManager,
    busybox_rootfs: Path,
    debian_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    mgr = pooled
    deb, bb = str(debian_rootfs), str(busybox_rootfs)
    mgr.prewarm(InstanceSpec(image=bb, command=("true",), limits=SHAPE), 2)
    first = mgr.run(
        InstanceSpec(
            image=deb,
            command=("sleep", "300"),
            name="first",
            limits=SHAPE,
            members=(MemberSpec("side", bb, ("httpd", "-f", "-p", "9999")),),
        )
    )
    ns_first = _sh(mgr, "first", "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc")
    _sh(mgr, "first", "ipcmk -M 4096 >/dev/null && ipcs -m | grep -c 4096")
    assert ":9999" in _sh(mgr, "first", "netstat -ltn", "side")
    assert len(mgr.pool_store.list()) == 1  # one of two left: the pool is below its target
    mgr.remove("first", force=True)
    back = [m for m in mgr.pool_store.list() if m.sandbox_id == first.sandbox_id]
    assert back and back[0].phase == "ready", "the released sandbox went back to its pool"
    assert mgr.engine.get(first.sandbox_id or "").name == back[0].sandbox_name
    second = mgr.run(
        InstanceSpec(
            image=deb,
            command=("sleep", "300"),
            name="second",
            limits=SHAPE,
            members=(MemberSpec("side", bb, ("sleep", "300")),),
        )
    )
    # the same sandbox, netns and veth ...
    assert second.sandbox_id == first.sandbox_id and second.ip == first.ip
    ns_second = _sh(mgr, "second", "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc")
    assert ns_second.splitlines()[0] == ns_first.splitlines()[0]
    host_dev = host_link(second.sandbox_id or "")
    assert Path("/sys/class/net", host_dev).exists() and "rate 30Mbit" in _tc(host_dev)
    # ... and nothing of the first instance: processes, listener, SysV IPC, name, hosts
    assert ns_second.splitlines()[1] != ns_first.splitlines()[1], "a fresh IPC namespace"
    assert "4096" not in _sh(mgr, "second", "ipcs -m")
    assert ":9999" not in _sh(mgr, "second", "netstat -ltn", "side")
    assert _sh(mgr, "second", "hostname", "side") == "second\n"
    hosts = _sh(mgr, "second", "cat /etc/hosts", "side")
    assert "first" not in hosts and f"{second.ip}\tsecond" in hosts
    procs = _sh(mgr, "second", "ps -o args", "side")
    assert "httpd" not in procs
    pids = {
        int(p)
        for d in Path("/sys/fs/cgroup").glob(f"*/{second.cgroup}")
        for f in d.rglob("cgroup.procs")
        for p in f.read_text().split()
    }
    cmdlines = {
        Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
        for p in pids
        if os.path.exists(f"/proc/{p}")
    }
    assert b"httpd" not in cmdlines, cmdlines
    mgr.remove("second", force=True)
    mgr.pools.drain()
    assert not pod_cgroups(engine_settings)
    assert_nothing_left(engine_settings)


def test_misses_evict_idle_members_rather_than_overbook_the_node(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    engine = Engine(engine_settings)
    mgr = InstanceManager(engine, InstanceSettings(pool_max=2, capacity_cpus=1.0))
    img = str(busybox_rootfs)
    try:
        mgr.prewarm(InstanceSpec(image=img, command=("true",), limits=SHAPE), 2)  # 1 CPU
        assert mgr.pools.pooled().cpus == pytest.approx(1.0)
        other = Limits(cpus=0.5, memory_bytes=48 * MiB)  # another shape: a miss
        mgr.run(InstanceSpec(image=img, command=("sleep", "300"), name="big", limits=other))
        assert mgr.reserved().cpus + mgr.pools.pooled().cpus <= 1.0 + 1e-9
        assert len(mgr.pool_store.list()) == 1  # one 0.5-CPU member made room
        mgr.remove("big", force=True)
        mgr.pools.drain()
        assert_nothing_left(engine_settings)
    finally:
        cleanup_engine(engine)


def test_the_api_prewarms_reports_and_drains_and_the_refill_follows_demand(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    d = Daemon(
        engine_settings, parts=[partial(instance_part, settings=InstanceSettings(pool_max=2))]
    )
    d.start()
    client = InstanceClient(engine_settings.resolved_socket_path())
    try:
        spec = InstanceSpec(image=str(busybox_rootfs), command=("sleep", "300"), limits=SHAPE)
        st = client.prewarm_pool(spec, 1)
        assert (st["ready"], st["target"]) == (1, 1)
        (listed,) = client.pools()
        assert listed["shape"]["runtime"] == "runc" and listed["shape"]["limits"]["cpus"] == 0.5
        a = client.run_instance(dataclasses.replace(spec, name="a"))
        assert a["pool_member"] and "cgroup" not in a["timings"]  # prewarmed: a hit
        # the refill makes a member again at once; b takes it or misses and makes its own
        b = client.run_instance(dataclasses.replace(spec, name="b"))
        assert ("cgroup" in b["timings"]) == (not b["pool_member"])
        (st,) = client.wait_pools_ready(60)
        assert st["hits"] + st["misses"] == 2 and st["hits"] >= 1
        assert st["ready"] >= st["target"] >= 1 and st["in_use"] == 1 + bool(b["pool_member"])
        client.remove_instance("a", force=True)
        client.remove_instance("b", force=True)
        assert client.drain_pools() >= 1
        assert client.pools()[0]["ready"] == 0
    finally:
        with contextlib.suppress(TidalError):
            for item in client.instances():
                client.remove_instance(item["id"], force=True)
            client.drain_pools()
        client.close()
        d.close()
        cleanup_engine(Engine(engine_settings))
    assert_nothing_left(engine_settings)


def test_a_runsc_hit_runs_the_members_in_the_warm_gvisor_sandbox(
    pooled: InstanceManager, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    from .test_instances_runsc import _need_runsc

    _need_runsc()
    mgr = pooled
    img = str(busybox_rootfs)
    spec = InstanceSpec(image=img, command=("sleep", "300"), runtime="runsc", limits=SHAPE)
    mgr.prewarm(spec, 1)
    (warm,) = mgr.pool_store.list()
    time.sleep(0.5)  # an idle warm gVisor sandbox stays up
    assert mgr.engine.get(warm.sandbox_id or "").status == "running"
    rec = mgr.run(
        dataclasses.replace(
            spec, name="gvhit", members=(MemberSpec("side", img, ("sleep", "300")),)
        )
    )
    assert rec.sandbox_id == warm.sandbox_id and rec.ip == warm.ip
    for member in ("main", "side"):
        assert "gVisor" in _sh(mgr, "gvhit", "dmesg", member)
        assert _sh(mgr, "gvhit", "hostname", member) == "gvhit\n"
    mgr.remove("gvhit", force=True)  # runsc: torn down, never reused
    assert mgr.pool_store.list() == []
    mgr.pools.drain()
    assert_nothing_left(engine_settings)
