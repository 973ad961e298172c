"""Pure lifecycle tests: the real Engine, monitor and store on the fake runtime, mounter and
network (tidal.testing.engine). No root, no runc, no mounts; they run as any user.

The containers are host processes started by the real monitor, so exit codes, signals, logs,
the monitor's records and the daemon-restart paths are the production code's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tidal.engine.containers import Engine
from tidal.engine.launcher import hand_over, launch_monitor
from tidal.engine.spec import ContainerSpec, PortMapping, QuotaSpec, VolumeSpec
from tidal.errors import (
    ConfigError,
    ContainerNotFoundError,
    ContainerStateError,
    EngineError,
    OciRuntimeError,
)
from tidal.testing.engine import FakeMounter, FakeNetwork, FakeRuntime, fake_engine, fake_rootfs


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Any]:
    """One fake node: its mounter and network outlive engine instances (restarts)."""
    return {
        "root": tmp_path,
        "mounter": FakeMounter(tmp_path / "host"),
        "network": FakeNetwork(tmp_path / "host"),
        "image": fake_rootfs(tmp_path / "img-v1", [("etc/version", "1\n")]),
    }


def start_engine(node: dict[str, Any], **settings: Any) -> Engine:
    eng: Engine = fake_engine(
        node["root"], mounter=node["mounter"], network=node["network"], **settings
    )
    return eng


@pytest.fixture
def eng(node: dict[str, Any]) -> Iterator[Engine]:
    e = start_engine(node, default_disk_quota_bytes=32 << 20)
    try:
        yield e
    finally:
        for rec in e.store.list():
            e.remove(rec.id, force=True)
        assert_nothing_left(e, node)
        e.close()


def assert_nothing_left(e: Engine, node: dict[str, Any]) -> None:
    assert node["mounter"].table() == {}, "mounts left behind"
    assert node["network"].namespaces() == {}, "network namespaces left behind"
    rt = e.runtime("runc")
    assert rt.list_ids() == [], "runtime containers left behind"
    assert list(e.containers_dir.iterdir()) == []


def spec(node: dict[str, Any], *cmd: str, **kw: Any) -> ContainerSpec:
    return ContainerSpec(image=str(node["image"]), command=cmd, **kw)


def logs(e: Engine, cid: str) -> str:
    return e.logs(cid).data.decode()


def test_run_exit_code_logs_and_records(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.run(spec(node, "sh", "-c", "echo out; echo err >&2; exit 3"))
    assert rec.status == "running" and rec.pid > 0 and rec.monitor_pid > 0
    assert rec.starts == 1
    rec = eng.wait(rec.id, 10)
    assert (rec.status, rec.exit_code, rec.signal) == ("exited", 3, None)
    assert sorted(logs(eng, rec.id).split()) == ["err", "out"]
    # the storage plan went through the one mounter: quota volume, then the overlay
    assert rec.rootfs.volume is not None and rec.rootfs.layer is not None
    table = node["mounter"].table()
    assert table[rec.rootfs.volume.mountpoint]["type"] == "ext4-loop"
    assert table[rec.rootfs.layer.merged]["type"] == "overlay"
    assert node["mounter"].made["mkfs"] == 1


def test_stop_is_sigterm_then_sigkill(eng: Engine, node: dict[str, Any]) -> None:
    polite = eng.run(spec(node, "sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"))
    stubborn = eng.run(spec(node, "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"))
    time.sleep(0.2)  # let the traps be installed
    assert eng.stop(polite.id, timeout_s=5).exit_code == 0
    t0 = time.monotonic()
    rec = eng.stop(stubborn.id, timeout_s=0.3)
    assert (rec.exit_code, rec.signal) == (137, 9)
    assert time.monotonic() - t0 < 5


def test_kill_exec_and_state_errors(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.run(spec(node, "sleep", "30", env=(("GREETING", "hello"),)))
    res = eng.exec(rec.id, ["sh", "-c", "echo $GREETING $EXTRA"], env=["EXTRA=world"])
    assert (res.exit_code, res.stdout) == (0, b"hello world\n")
    with pytest.raises(ConfigError, match="exec needs a command"):
        eng.exec(rec.id, [])
    with pytest.raises(ContainerStateError, match="is running"):
        eng.remove(rec.id)
    with pytest.raises(ContainerStateError, match="already running"):
        eng.start(rec.id)
    rec = eng.kill(rec.id, "TERM")
    rec = eng.wait(rec.id, 10)
    assert (rec.exit_code, rec.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(ContainerStateError, match="not running"):
        eng.kill(rec.id)
    with pytest.raises(ContainerStateError, match="exec needs a running"):
        eng.exec(rec.id, ["true"])
    with pytest.raises(ContainerNotFoundError):
        eng.get("no-such-container")


def test_restart_of_an_exited_container(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.run(spec(node, "sh", "-c", "echo run"))
    rec = eng.wait(rec.id, 10)
    first_pid = rec.pid
    rec = eng.wait(eng.start(rec.id).id, 10)
    assert rec.exit_code == 0 and rec.starts == 2 and rec.pid != first_pid
    assert logs(eng, rec.id) == "run\nrun\n"


def test_update_goes_to_the_runtime(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.run(spec(node, "sleep", "30"))
    rec = eng.update(rec.id, memory_bytes=64 << 20, pids_limit=50)
    assert rec.spec.memory_bytes == 64 << 20 and rec.spec.pids_limit == 50
    rt = eng.runtime(rec.runtime)
    assert isinstance(rt, FakeRuntime)
    assert rt.resources(rec.id)["memory"]["limit"] == 64 << 20
    assert rt.resources(rec.id)["pids"]["limit"] == 50


def test_failed_start_removes_everything(eng: Engine, node: dict[str, Any]) -> None:
    with pytest.raises(OciRuntimeError, match="executable file not found"):
        eng.run(spec(node, "/no/such/binary"))
    assert eng.store.list() == []  # the fixture checks mounts, netns, runtime, directories


def test_bad_input_fails_before_anything_is_made(eng: Engine, node: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="does not exist on this host"):
        eng.run(spec(node, "true", volumes=(VolumeSpec("/data", source="/no/such/dir"),)))
    assert eng.store.list() == []
    node["network"].taken_ports.add(8080)
    with pytest.raises(ConfigError, match="in use by another process"):
        eng.create(spec(node, "true", network="bridge", ports=(PortMapping(8080, 80),)))
    assert eng.store.list() == []


def test_volumes_quota_and_bridge_network(eng: Engine, node: dict[str, Any]) -> None:
    host_dir = node["root"] / "shared"
    host_dir.mkdir()
    rec = eng.create(
        spec(
            node,
            "true",
            network="bridge",
            volumes=(VolumeSpec("/data"), VolumeSpec("/host", source=str(host_dir))),
            disk_quotas=(QuotaSpec("/data", 8 << 20, 128),),
        )
    )
    assert rec.ip is not None and rec.ip != "10.88.0.1"
    assert node["network"].namespaces() == {rec.id: rec.ip}
    data, host = rec.rootfs.volumes
    assert data.volume is not None and data.volume.size_bytes == 8 << 20
    assert host.path == str(host_dir) and host.volume is None
    assert eng.wait(eng.start(rec.id).id, 10).exit_code == 0  # the bundle is written at start
    bundle = json.loads((eng.cdir(rec.id) / "bundle" / "config.json").read_text())
    netns = [n for n in bundle["linux"]["namespaces"] if n["type"] == "network"]
    assert netns == [{"type": "network", "path": node["network"].netns_path(rec.id)}]
    other = eng.create(spec(node, "true", network="bridge"))
    assert other.ip != rec.ip


def test_pod_members_join_namespace_files_and_start_before_their_sandbox(
    eng: Engine, node: dict[str, Any]
) -> None:
    """Under runc/crun the sandbox's create makes the pod's IPC and UTS namespaces as files
    (named after the pod), so a member starts without waiting for the sandbox to run, and
    removing the sandbox removes them."""
    sandbox = eng.create(
        spec(node, "sleep", "30", network="bridge", hostname="pod1", pod_sandbox=True)
    )
    nsdir = eng.pod_ns_dir(sandbox.id)
    assert eng.pod_namespaces.exists(nsdir)
    assert (nsdir / "uts").read_text() == "pod1\n"
    member = eng.create(spec(node, "sleep", "30", hostname="pod1", sandbox=sandbox.id))
    assert eng.start(member.id).status == "running"  # the sandbox is still only created
    assert eng.start(sandbox.id).status == "running"
    for cid, netns in ((member.id, sandbox.id), (sandbox.id, sandbox.id)):
        bundle = json.loads((eng.cdir(cid) / "bundle" / "config.json").read_text())
        ns = {n["type"]: n.get("path") for n in bundle["linux"]["namespaces"]}
        assert ns["ipc"] == str(nsdir / "ipc") and ns["uts"] == str(nsdir / "uts"), cid
        assert ns["network"] == node["network"].netns_path(netns), cid
        assert "hostname" not in bundle  # set once, in the namespace
    eng.remove(member.id, force=True)
    eng.remove(sandbox.id, force=True)
    assert not nsdir.exists() and eng.pod_namespaces.destroyed == 1


def test_a_sandbox_never_started_is_only_its_namespaces(
    eng: Engine, node: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runc pod's sandbox without ports is never started
    (``InstanceManager.sandbox_runs``): a member restarted after a host reboot took its netns
    and namespace files finds them made again (same address, same hostname), and removing the
    sandbox asks the runtime nothing, as the runtime never heard of it."""
    sandbox = eng.create(
        spec(node, "sleep", "30", network="bridge", hostname="pod1", pod_sandbox=True)
    )
    member = eng.create(spec(node, "sleep", "30", hostname="pod1", sandbox=sandbox.id))
    assert eng.start(member.id).status == "running"
    eng.stop(member.id, timeout_s=0)
    nsdir = eng.pod_ns_dir(sandbox.id)
    node["network"].destroy_netns(sandbox.id)  # what a reboot takes
    eng.pod_namespaces.destroy(nsdir)
    assert eng.start(member.id).status == "running"
    assert eng.pod_namespaces.exists(nsdir) and (nsdir / "uts").read_text() == "pod1\n"
    assert node["network"].namespaces() == {sandbox.id: sandbox.ip}
    bundle = json.loads((eng.cdir(member.id) / "bundle" / "config.json").read_text())
    ns = {n["type"]: n.get("path") for n in bundle["linux"]["namespaces"]}
    assert ns["network"] == node["network"].netns_path(sandbox.id)
    assert eng.get(sandbox.id).status == "created"
    rt = eng.runtime("runc")
    real_delete = rt.delete
    deleted: list[str] = []

    def delete(cid: str, **kw: Any) -> None:
        deleted.append(cid)
        real_delete(cid, **kw)

    monkeypatch.setattr(rt, "delete", delete)
    eng.remove(member.id, force=True)
    eng.remove(sandbox.id, force=True)
    assert deleted == [member.id]
    assert not nsdir.exists() and node["network"].namespaces() == {}


def test_a_container_of_its_own_makes_no_pod_namespaces(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.create(spec(node, "true", network="bridge"))
    assert not eng.pod_ns_dir(rec.id).exists() and eng.pod_namespaces.created == 0


def test_upgrade_swaps_the_image_and_keeps_the_rest(eng: Engine, node: dict[str, Any]) -> None:
    v2 = fake_rootfs(node["root"] / "img-v2", [("etc/version", "2\n")])
    rec = eng.run(spec(node, "sleep", "30", network="bridge"))
    old_layer = rec.rootfs.layer
    assert old_layer is not None
    rec = eng.upgrade(rec.id, str(v2))
    assert rec.status == "running" and rec.spec.image == str(v2)
    layer = rec.rootfs.layer
    assert layer is not None and layer.generation == 1 and layer.lower == str(v2)
    assert rec.rootfs.volume == eng.store.get(rec.id).rootfs.volume  # same quota volume
    assert not Path(old_layer.upper).exists()  # the old generation's layer was dropped
    assert rec.ip == eng.store.get(rec.id).ip


def test_failed_upgrade_rolls_back_and_restarts(
    eng: Engine, node: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    v2 = fake_rootfs(node["root"] / "img-v2")
    rec = eng.run(spec(node, "sleep", "30"))
    old_layer = rec.rootfs.layer
    with pytest.raises(EngineError, match=r"rolled back to .*img-v1 and restarted it"):
        eng.upgrade(rec.id, str(v2), ("sh", "-c", "echo broken; exit 4"))
    rec = eng.get(rec.id)
    assert rec.status == "running" and rec.spec.image == str(node["image"])
    assert rec.spec.command == ("sleep", "30")
    assert rec.rootfs.layer == old_layer
    assert Path(old_layer.upper).is_dir() if old_layer else False
    new_upper = Path(old_layer.upper).with_name("upper.1") if old_layer else None
    assert new_upper is not None and not new_upper.exists()  # only the new layer was dropped


def test_restarted_engine_finds_running_and_exited_containers(node: dict[str, Any]) -> None:
    e1 = start_engine(node)
    long = e1.run(spec(node, "sleep", "30", name="long"))
    quick = e1.run(spec(node, "sh", "-c", "sleep 0.3; exit 5", name="quick"))
    e1.close()  # the daemon goes away; monitors keep the containers
    time.sleep(0.8)  # "quick" exits while no engine runs
    e2 = start_engine(node)
    try:
        counts = e2.reconcile()
        assert counts == {"running": 1, "exited": 1}
        assert e2.get("quick").exit_code == 5
        rec = e2.get("long")
        assert rec.status == "running" and rec.pid == long.pid
        assert e2.exec("long", ["echo", "still-here"]).stdout == b"still-here\n"
        assert e2.stop("long", timeout_s=0.2).signal in (signal.SIGTERM, signal.SIGKILL)
        assert quick.id in {r.id for r in e2.list_all()}
    finally:
        for r in e2.store.list():
            e2.remove(r.id, force=True)
        assert_nothing_left(e2, node)
        e2.close()


def test_start_in_flight_when_the_daemon_died_is_folded_in(node: dict[str, Any]) -> None:
    """The engine dies after the monitor started the container but before it recorded that:
    the record says created with pid 0 while the runtime runs it. A restart must agree with
    the runtime."""
    e1 = start_engine(node)
    rec = e1.create(spec(node, "sleep", "30"))
    e1._ensure_host(rec)
    report = hand_over(e1._monitor_conf(rec, e1._bundle(rec)), launch_monitor())
    assert report.ok
    assert e1.store.get(rec.id).status == "created"  # what a SIGKILL here leaves
    e1.close()
    e2 = start_engine(node)
    try:
        assert e2.reconcile() == {"running": 1}
        got = e2.get(rec.id)
        st = e2.runtime("runc").state(rec.id)
        assert st is not None and st.status == "running"
        assert (got.status, got.pid, got.starts) == ("running", st.pid, 1)
        assert e2.wait(e2.kill(rec.id, "KILL").id, 10).signal == signal.SIGKILL
    finally:
        for r in e2.store.list():
            e2.remove(r.id, force=True)
        assert_nothing_left(e2, node)
        e2.close()


def test_monitor_that_died_while_starting_is_reported(eng: Engine, node: dict[str, Any]) -> None:
    rec = eng.create(spec(node, "sleep", "30"))
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (eng.cdir(rec.id) / "start.json").write_text(
        json.dumps({"state": "starting", "start_seq": 1, "monitor_pid": dead})
    )
    rec = eng.get(rec.id)
    assert rec.status == "exited" and "died while starting" in (rec.error or "")
    assert rec.starts == 1


def test_cleanup_failures_are_reported_and_logged(
    eng: Engine, node: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    rec = eng.run(spec(node, "true"))
    eng.wait(rec.id, 10)
    layer = rec.rootfs.layer
    assert layer is not None
    node["mounter"].fail_unmount.add(layer.merged)
    with caplog.at_level(logging.WARNING), pytest.raises(EngineError, match="retry 'tidal rm'"):
        eng.remove(rec.id)
    assert any("target is busy" in r.getMessage() for r in caplog.records)
    assert "target is busy" in (eng.store.get(rec.id).error or "")
    node["mounter"].fail_unmount.clear()
    eng.remove(rec.id)  # the retry finishes the job


def test_rm_unmounts_what_no_record_names(eng: Engine, node: dict[str, Any]) -> None:
    """A daemon killed between making a mount and recording it: rm still leaves nothing."""
    rec = eng.create(spec(node, "true"))
    stray = eng.cdir(rec.id) / "volumes" / "9"
    node["mounter"].apply([_stray(stray)])
    assert node["mounter"].mounted(str(stray))
    eng.remove(rec.id)
    assert not node["mounter"].mounted(str(stray))


def _stray(target: Path) -> Any:
    from tidal.engine.state import OVERLAY, Mount

    return Mount(OVERLAY, OVERLAY, str(target), ("lowerdir=/x",))


def test_monitor_pool_keeps_a_warm_monitor_and_ends_it_on_close(
    eng: Engine, node: dict[str, Any]
) -> None:
    """Starts take an imported, waiting monitor (its start-up is off the start path)."""
    from tidal.engine.launcher import MonitorPool

    pool = MonitorPool(size=1, zygote=False)  # the interpreters-ahead mode
    first = pool.take()  # nothing ready yet: a fresh one
    assert not pool._ready
    pool.replenish()  # after the start: a spare, in the background
    pool.replenish()  # one spare at most
    deadline = time.monotonic() + 10
    while not pool._ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pool._ready) == 1
    spare = pool._ready[0]
    assert spare.usable() and pool.take() is spare and not pool._ready
    first.abort()
    pool.close()
    spare.abort()
    assert pool._ready == deque() and not spare.usable()
    rec = eng.run(spec(node, "true"))  # the engine's own pool serves starts
    assert eng.wait(rec.id, 10).exit_code == 0


def test_monitors_forked_by_the_zygote_outlive_it_and_a_dead_zygote_is_replaced(
    eng: Engine, node: dict[str, Any]
) -> None:
    """The default pool forks monitors from one imported process: a container it started
    keeps running (and reports its exit) after the zygote is killed; the next start falls
    back or starts a new zygote, and still starts; close ends the zygote."""

    from tidal.engine.launcher import ZygoteLaunch

    launch = eng.monitors.take()
    assert isinstance(launch, ZygoteLaunch) and launch.usable()
    zygote = launch.zygote
    rec = eng.run(spec(node, "sh", "-c", "sleep 1; exit 7"))
    assert eng.get(rec.id).status == "running"
    monitor = eng.get(rec.id).monitor_pid
    assert monitor and monitor != zygote.proc.pid
    os.kill(zygote.proc.pid, signal.SIGKILL)
    zygote.proc.wait()
    assert not launch.usable()
    again = eng.run(spec(node, "true"))  # a dead zygote: this start still goes through
    assert eng.wait(again.id, 10).exit_code == 0
    assert eng.wait(rec.id, 10).exit_code == 7  # its monitor outlived the zygote
    fresh = eng.monitors.take()
    assert isinstance(fresh, ZygoteLaunch) and fresh.zygote is not zygote
    eng.monitors.close()
    assert fresh.zygote.proc.poll() is not None and not fresh.usable()


def test_interactive_stdin_reaches_the_container_through_its_monitor(
    eng: Engine, node: dict[str, Any]
) -> None:
    """``-i``: the monitor holds the container's stdin and serves the attach socket; EOF from
    the client closes it. A plain container's stdin is /dev/null."""
    from tidal.engine import attach

    rec = eng.run(
        ContainerSpec(
            image=str(node["image"]), command=("sh", "-c", "cat; echo eof"), interactive=True
        )
    )
    path = eng.inspect(rec.id)["attach_socket"]
    with attach.connect(path) as sock:
        sock.sendall(attach.frame(attach.STDIN, b"to cat\n") + attach.frame(attach.STDIN_EOF))
        rec = eng.wait(rec.id, 20)
    assert rec.exit_code == 0 and eng.logs(rec.id).data == b"to cat\neof\n"
    assert "attach_socket" not in eng.inspect(rec.id) and not Path(path).exists()
    plain = eng.run(ContainerSpec(image=str(node["image"]), command=("sh", "-c", "cat; echo eof")))
    assert eng.wait(plain.id, 20).exit_code == 0 and eng.logs(plain.id).data == b"eof\n"
    with pytest.raises(OciRuntimeError, match="no terminals"):
        eng.run(ContainerSpec(image=str(node["image"]), command=("sh",), tty=True))


def test_listing_during_a_start_folds_nothing_in(
    eng: Engine,
    node: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitor records ``start.json`` before this engine records the start; a listing in
    between is normal operation, not a start no daemon recorded (that fold warns)."""
    import threading

    rec = eng.create(spec(node, "sleep", "30"))
    reported = threading.Event()
    real_fold = eng._fold_start

    def slow_fold(r: Any, report: Any) -> Any:
        reported.set()  # the monitor's start.json says running; the store does not yet
        time.sleep(0.3)
        return real_fold(r, report)

    monkeypatch.setattr(eng, "_fold_start", slow_fold)
    started = threading.Thread(target=eng.start, args=(rec.id,))
    with caplog.at_level(logging.WARNING, logger="tidal.engine.containers"):
        started.start()
        assert reported.wait(10)
        seen = {r.id: r.status for r in eng.list_all()}
        started.join(10)
    assert seen[rec.id] == "created"
    assert eng.get(rec.id).status == "running"
    assert not [r for r in caplog.records if "folded in" in r.getMessage()]


def test_a_refused_sigkill_to_a_container_that_ended_meanwhile_is_no_warning(
    eng: Engine,
    node: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runsc refuses a kill to a sandbox that stopped since the TERM wait ("sandbox is not
    running"): the wait after it decides, and only a container still running is a warning."""
    slow = eng.run(
        spec(node, "sh", "-c", "trap 'sleep 0.6; exit 0' TERM; while :; do sleep 0.05; done")
    )
    time.sleep(0.2)  # let the trap be installed
    rt = eng.runtime("runc")
    real_kill = rt.kill

    def kill(cid: str, signal: str = "TERM", *, all_processes: bool = False) -> None:
        if signal == "KILL":
            raise OciRuntimeError(f"runsc kill {cid} failed: sandbox is not running")
        real_kill(cid, signal, all_processes=all_processes)

    monkeypatch.setattr(rt, "kill", kill)
    with caplog.at_level(logging.DEBUG, logger="tidal.engine.containers"):
        rec = eng.stop(slow.id, timeout_s=0.2)
    assert rec.status == "exited" and rec.exit_code == 0
    said = [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert said and all(r.levelno == logging.DEBUG for r in said)


def test_a_read_only_root_has_no_overlay_no_volume_and_survives_its_json(
    eng: Engine, node: dict[str, Any]
) -> None:
    """A sandbox's root: the image's tree itself, read-only in the runtime's config, with no
    overlay and no quota volume on the host; its record reads back the same."""
    mkfs_before = node["mounter"].made.get("mkfs", 0)
    rec = eng.run(spec(node, "sh", "-c", "exit 0", read_only_rootfs=True))
    layer = rec.rootfs.layer
    assert layer is not None and layer.readonly and rec.rootfs.volume is None
    assert layer.merged == layer.lower == str(node["image"])
    assert node["mounter"].table() == {}  # nothing mounted for it
    assert node["mounter"].made.get("mkfs", 0) == mkfs_before
    config = json.loads((eng.cdir(rec.id) / "bundle" / "config.json").read_text())
    assert config["root"] == {"path": str(node["image"]), "readonly": True}
    assert eng.get(rec.id).rootfs == rec.rootfs  # the store's JSON keeps the flag
    eng.wait(rec.id, 10)
    eng.remove(rec.id)
    assert (node["image"] / "etc" / "version").read_text() == "1\n"  # the image is untouched
    with pytest.raises(ConfigError, match="read-only root has no writable layer"):
        spec(node, "true", read_only_rootfs=True, disk_quotas=(QuotaSpec("/", 1 << 20),))
