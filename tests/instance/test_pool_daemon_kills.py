"""Warm pools survive a SIGKILL of the real ``tidal daemon`` at random points of a burst of
creates and removes: no acknowledged instance is lost, none is duplicated, no sandbox serves
two owners, and nothing of a pool member leaks (container, netns/veth, pod cgroup, namespace
file or mount); the restarted daemon refills the pools. The daemon harness is the one of
``test_instance_daemon_kills.py`` (``start_daemon``, the leak checks of ``conftest.py``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.network import host_link
from tidal.engine.settings import EngineSettings
from tidal.errors import DaemonUnavailableError, TidalError
from tidal.instance.client import InstanceClient
from tidal.instance.manager import LABEL_ID, LABEL_POOL_MEMBER
from tidal.instance.spec import InstanceSpec, Limits
from tidal.testing.daemon import start_daemon
from tidal.units import MiB

from .conftest import assert_nothing_left, cleanup_engine, namespace_mounts, pod_cgroups

ROUNDS = 3
POOL_MAX = 3
SHAPE = Limits(cpus=0.25, memory_bytes=32 * MiB, egress_bps=20_000_000)


BURST = """
import json, sys, threading
from pathlib import Path
from tidal.errors import TidalError
from tidal.instance.client import InstanceClient
from tidal.instance.spec import InstanceSpec
sock, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
lock = threading.Lock()
def say(line):
    with lock:
        print(line, flush=True)
def create(name):
    try:
        with InstanceClient(sock) as c:
            c.run_instance(InstanceSpec.from_json({**spec, "name": name}))
    except (TidalError, OSError):
        return
    say("ok " + name)
def remove(name):
    try:
        with InstanceClient(sock) as c:
            c.remove_instance(name, force=True)
    except (TidalError, OSError):
        return
    say("gone " + name)
work = [threading.Thread(target=create, args=(n,)) for n in sys.argv[3].split(",") if n]
work += [threading.Thread(target=remove, args=(n,)) for n in sys.argv[4].split(",") if n]
say("go")
for w in work:
    w.start()
for w in work:
    w.join()
"""
"""A client process: creates and removes at once, printing ``ok NAME`` / ``gone NAME`` for
each the daemon acknowledged."""


def _member_records(settings: EngineSettings) -> list[dict[str, object]]:
    d = settings.resolved_state_dir() / "instances" / "pool"
    return [json.loads(p.read_text()) for p in d.glob("*.json")]


def _consistent(client: InstanceClient, settings: EngineSettings, acked: set[str]) -> list[str]:
    """Disagreements between the instances, the pool member records and the host."""
    bad = []
    items = client.instances()
    names = [d["name"] for d in items]
    bad += [f"instance {n} is listed twice" for n in set(names) if names.count(n) > 1]
    bad += [f"acknowledged instance {n} was lost" for n in acked - set(names)]
    for d in items:
        states = {c["member"]: c["status"] for c in d["containers"]}
        # runc: the sandbox is only created (no pause process)
        if d["status"] != "running" or states != {"sandbox": "created", "main": "running"}:
            bad.append(f"instance {d['name']}: {d['status']} {states}")
    members = _member_records(settings)
    ready = [m for m in members if m["phase"] == "ready"]
    if len(ready) != len(members):
        bad.append(f"pool members not ready after reconcile: {[m['phase'] for m in members]}")
    sandboxes = [c["id"] for d in items for c in d["containers"] if c["member"] == "sandbox"]
    sandboxes += [str(m["sandbox_id"]) for m in members]
    bad += [f"sandbox {s[:12]} has two owners" for s in set(sandboxes) if sandboxes.count(s) > 1]
    containers = client.list_all()
    ids = {d["id"] for d in items}
    member_ids = {str(m["id"]) for m in members}
    for rec in containers:
        labels = dict(rec.spec.labels)
        if labels.get(LABEL_ID) not in ids and labels.get(LABEL_POOL_MEMBER) not in member_ids:
            bad.append(f"container {rec.name} belongs to no instance and no pool member")
        elif LABEL_POOL_MEMBER in labels and rec.status != "created":  # runc: no pause process
            bad.append(f"warm sandbox {rec.name} is {rec.status}")
    pods = {Path(p).name for p in pod_cgroups(settings)}
    known = {Path(str(d["cgroup"])).name for d in items} | {
        Path(str(m["cgroup"])).name for m in members
    }
    bad += [f"pod cgroup {p} belongs to nothing" for p in sorted(pods - known)]
    brif = Path("/sys/class/net") / settings.bridge / "brif"
    veths = set(os.listdir(brif)) if brif.is_dir() else set()
    mine = {host_link(rec.id) for rec in containers}
    bad += [f"veth {v} belongs to no container" for v in sorted(veths - mine)]
    state = settings.resolved_state_dir()
    cids = {rec.id for rec in containers}
    for entry in namespace_mounts(state):
        if not any(f"/containers/{cid}/" in entry for cid in cids):
            bad.append(f"namespace mount or file of no container: {entry}")
    return bad


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.netns
@pytest.mark.loop
@pytest.mark.slow
def test_pools_survive_kills_during_a_burst(
    engine_settings: EngineSettings,
    busybox_rootfs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = int(os.environ.get("TIDAL_TEST_SEED", time.time()))
    rng = random.Random(seed)
    monkeypatch.setenv("TIDAL_INSTANCE__POOL_MAX", str(POOL_MAX))
    # Room for every instance the rounds can leave running (up to 4 per round) and a full
    # pool: on a 2-CPU node, 8 live instances of 0.25 CPUs take it all and the refill
    # rightly holds back ("held back: no room"), which is not what this test is about.
    monkeypatch.setenv("TIDAL_INSTANCE__CAPACITY_CPUS", str(SHAPE.cpus * (4 * ROUNDS + POOL_MAX)))
    log = tmp_path / "daemon.log"
    sock = engine_settings.resolved_socket_path()
    spec = InstanceSpec(image=str(busybox_rootfs), command=("sleep", "300"), limits=SHAPE)
    acked: set[str] = set()
    lock = threading.Lock()
    proc = start_daemon(engine_settings, log, timeout_s=90)
    try:
        with InstanceClient(sock) as client:
            client.prewarm_pool(spec, POOL_MAX)

        for rnd in range(ROUNDS):
            with lock:
                old = sorted(acked)
                acked.difference_update(old[:2])  # a removal in flight may or may not finish
            # the burst comes from one child process (its clients' sockets die with the
            # daemon; httpx leaks the socket of a refused connect, which must not be ours)
            burst = subprocess.Popen(
                [sys.executable, "-c", BURST, str(sock), json.dumps(spec.to_json()),
                 ",".join(f"r{rnd}n{i}" for i in range(4)), ",".join(old[:2])],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert burst.stdout is not None
            assert burst.stdout.readline() == "go\n"  # its imports done: the burst starts now
            time.sleep(rng.uniform(0.05, 0.9))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out, _ = burst.communicate(timeout=120)
            gone: set[str] = set()
            for line in out.splitlines():
                verb, _, name = line.partition(" ")
                if verb == "ok":
                    acked.add(name)
                elif verb == "gone":
                    gone.add(name)
            proc = start_daemon(engine_settings, log, timeout_s=90)
            with InstanceClient(sock) as client:
                (st,) = client.wait_pools_ready(90)  # the restarted daemon refills
                assert st["ready"] >= st["target"] >= 1, st
                # the refill may be making a member right now (a transient "making"): a leak
                # persists, so look until the state is clean or the time is up
                deadline = time.monotonic() + 15
                while True:
                    bad = _consistent(client, engine_settings, acked - gone)
                    if not bad or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert not bad, f"round {rnd} (seed {seed}): {bad}"
            with lock, InstanceClient(sock) as client:
                acked.difference_update(gone)
                acked.intersection_update(d["name"] for d in client.instances())
        torn = log.read_text().count("tearing it down")
        print(f"{ROUNDS} kills (seed {seed}); half-made or orphaned members torn down: {torn}")
        with InstanceClient(sock) as client:
            for d in client.instances():
                client.remove_instance(d["id"], force=True)
            client.drain_pools()
            assert client.list_all() == []
        assert_nothing_left(engine_settings)
    finally:
        try:
            with InstanceClient(sock) as c:
                for d in c.instances():
                    c.remove_instance(d["id"], force=True)
                c.drain_pools()
        except (DaemonUnavailableError, TidalError):
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        cleanup_engine(Engine(engine_settings))
