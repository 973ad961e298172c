"""Real instances: runc pods on the bridge network, each pod-level limit measured against the
kernel, spec fallback, bad input leaving nothing behind, the CLI."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tidal.blockdev import ext4
from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon
from tidal.engine.network import gateway
from tidal.engine.podns import HostPodNamespaces
from tidal.engine.settings import EngineSettings
from tidal.engine.spec import ContainerSpec, PortMapping, QuotaSpec
from tidal.errors import ConfigError, NoCapacityError, OciRuntimeError
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.manager import InstanceManager
from tidal.instance.spec import InstanceSpec, Limits, MemberSpec
from tidal.testing.daemon import daemon_env
from tidal.units import GiB, MiB

from .conftest import assert_nothing_left, cleanup_engine, namespace_mounts, pod_cgroups

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.netns,
    pytest.mark.loop,
]
Client = tuple[Daemon, InstanceClient]


def _sh(client: InstanceClient, ref: str, script: str, container: str | None = None) -> str:
    res = client.instance_exec(ref, ["sh", "-c", script], container=container)
    assert res.exit_code == 0, (script, res.stdout, res.stderr)
    return res.stdout.decode()


def _pod_dir(settings: EngineSettings, rec: dict[str, object], ctrl: str) -> Path:
    return Path("/sys/fs/cgroup") / ctrl / str(rec["cgroup"])


def _ns_inode(link: str) -> int:
    """``ipc:[4026532280]`` -> 4026532280 (a namespace's inode, as ``readlink`` shows it)."""
    m = re.fullmatch(r"\w+:\[(\d+)\]", link.strip())
    assert m, link
    return int(m.group(1))


def test_pod_shares_network_ipc_uts_and_hosts_each_with_its_own_rootfs(
    instance_daemon: Client, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    rec = client.run_instance(
        InstanceSpec(
            image=img,
            command=("sh", "-c", "mkdir -p /www && exec httpd -f -p 8080 -h /www"),
            name="web",
            members=(MemberSpec("side", img, ("sleep", "300")),),
        )
    )
    assert rec["status"] == "running" and rec["ip"]
    assert [c["member"] for c in rec["containers"]] == ["sandbox", "main", "side"]
    _sh(client, "web", "mkdir -p /www && echo hello-from-main > /www/index.html")
    # localhost between the pod's containers; the side container does not see main's files
    assert _sh(client, "web", "wget -qO- http://127.0.0.1:8080/", "side") == "hello-from-main\n"
    assert _sh(client, "web", "ls /www 2>/dev/null || echo none", "side") == "none\n"
    ns = {}
    for member in ("main", "side"):
        ns[member] = _sh(
            client,
            "web",
            "for n in net ipc uts pid mnt; do readlink /proc/self/ns/$n; done; hostname; "
            "cat /etc/hosts",
            member,
        ).splitlines()
    main_ns, side_ns = ns["main"], ns["side"]
    assert main_ns[:3] == side_ns[:3], "net, ipc and uts are the sandbox's"
    assert main_ns[3:5] != side_ns[3:5], "each has its own pid and mount namespace"
    assert main_ns[5] == side_ns[5] == "web"
    assert f"{rec['ip']}\tweb" in main_ns and main_ns[6:] == side_ns[6:]
    # ... which are the pod's namespace files, made by the sandbox's create
    sandbox = rec["containers"][0]
    nsdir = engine_settings.resolved_state_dir() / "containers" / sandbox["id"] / "ns"
    held = HostPodNamespaces().paths(nsdir)  # in the holder's mount namespace
    for i, kind in ((1, held.ipc), (2, held.uts)):
        assert _ns_inode(main_ns[i]) == kind.stat().st_ino, kind
    # a runc pod without ports has no pause process: the sandbox is only created, the runtime
    # never heard of it, no bundle, no overlay, no quota disk on the host
    assert sandbox["status"] == "created" and not sandbox["pid"], sandbox
    sandbox_dir = nsdir.parent
    assert not (sandbox_dir / "bundle").exists() and not (sandbox_dir / "disk").exists()
    assert not ext4.is_mountpoint(sandbox_dir / "rootfs")
    runc_root = engine_settings.resolved_state_dir() / "runtime" / "runc"
    listed = subprocess.run(
        ["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True
    ).stdout.split()
    assert sandbox["id"] not in listed and rec["containers"][1]["id"] in listed, listed
    # every container sits below the pod's cgroup
    pod = _pod_dir(engine_settings, rec, "memory")
    kids = {p.name for p in pod.iterdir() if p.is_dir()}
    assert {c["id"] for c in rec["containers"]} == kids
    # reachable from the host on the pod's address
    assert httpx.get(f"http://{rec['ip']}:8080/", timeout=10).text == "hello-from-main\n"
    client.remove_instance("web", force=True)
    assert_nothing_left(engine_settings)


def test_rm_flag_removes_the_instance_once_main_exits(
    instance_daemon: Client, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    _, client = instance_daemon
    client.run_instance(
        InstanceSpec(
            image=str(busybox_rootfs), command=("sleep", "1"), name="brief", remove_on_exit=True
        )
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and client.instances():
        time.sleep(0.2)
    assert client.instances() == []
    assert_nothing_left(engine_settings)


def test_cpu_memory_and_pids_are_pod_level_cgroup_limits(
    instance_daemon: Client, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    spin = ("sh", "-c", "while :; do :; done")
    rec = client.run_instance(
        InstanceSpec(
            image=img,
            command=spin,
            name="lim",
            members=(MemberSpec("spin2", img, spin),),
            limits=Limits(cpus=0.5, memory_bytes=48 * MiB, pids=24),
        )
    )
    # CPU: two busy loops share the pod's 0.5 CPU
    usage = _pod_dir(engine_settings, rec, "cpuacct") / "cpuacct.usage"
    u0, t0 = int(usage.read_text()), time.monotonic()
    time.sleep(3)
    used = (int(usage.read_text()) - u0) / 1e9 / (time.monotonic() - t0)
    assert 0.3 < used < 0.6, f"pod used {used:.2f} CPUs, limit 0.5"
    # memory: a process growing past the pod's 48 MiB is OOM-killed
    res = client.instance_exec("lim", ["sh", "-c", "tail /dev/zero"], container="spin2")
    assert res.exit_code == 137, res
    peak = int((_pod_dir(engine_settings, rec, "memory") / "memory.max_usage_in_bytes").read_text())
    assert peak <= 48 * MiB
    # pids: forks beyond the pod's 24 fail
    res = client.instance_exec(
        "lim", ["sh", "-c", "for i in $(seq 40); do sleep 5 & done; wait"], container="main"
    )
    assert b"can't fork" in res.stderr, res
    pids_max = _pod_dir(engine_settings, rec, "pids") / "pids.max"
    assert pids_max.read_text().strip() == "24"


class _Blob(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def host_blob_server(engine_settings: EngineSettings) -> Iterator[tuple[str, int]]:
    """An HTTP server on the bridge's gateway address serving 2.5 MB (for ingress)."""
    _Blob.payload = os.urandom(2_500_000)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Blob)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield gateway(engine_settings.subnet), server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_bandwidth_is_shaped_both_ways_on_the_pods_veth(
    instance_daemon: Client,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    host_blob_server: tuple[str, int],
) -> None:
    _, client = instance_daemon
    rate = 5_000_000
    with socket.socket() as s:  # a free host port to publish on
        s.bind(("127.0.0.1", 0))
        host_port = s.getsockname()[1]
    rec = client.run_instance(
        InstanceSpec(
            image=str(busybox_rootfs),
            command=("httpd", "-f", "-p", "8080", "-h", "/"),
            name="net",
            members=(MemberSpec("side", str(busybox_rootfs), ("sleep", "300")),),
            limits=Limits(egress_bps=rate, ingress_bps=rate),
            ports=(PortMapping(host_port, 8080),),
        )
    )
    sandbox = rec["containers"][0]  # a published port is bound by its monitor: it runs
    assert sandbox["member"] == "sandbox" and sandbox["status"] == "running" and sandbox["pid"]
    n = 2_500_000
    _sh(client, "net", f"head -c {n} /dev/urandom > /blob")
    # egress: the host downloads from the instance
    t0 = time.monotonic()
    got = httpx.get(f"http://{rec['ip']}:8080/blob", timeout=60).content
    egress = len(got) * 8 / (time.monotonic() - t0)
    assert len(got) == n
    # ingress: a container of the pod downloads from the host
    host, port = host_blob_server
    t0 = time.monotonic()
    _sh(client, "net", f"wget -qO /dev/null http://{host}:{port}/blob", "side")
    ingress = n * 8 / (time.monotonic() - t0)
    # the published port (the sandbox holds it; main serves it) at the same shaped rate
    t0 = time.monotonic()
    got = httpx.get(f"http://127.0.0.1:{host_port}/blob", timeout=60).content
    published = len(got) * 8 / (time.monotonic() - t0)
    assert len(got) == n
    for what, measured in (("egress", egress), ("ingress", ingress), ("published", published)):
        assert 0.6 * rate < measured < 1.2 * rate, f"{what} {measured / 1e6:.2f} Mbit/s, limit 5"


def test_disk_throughput_and_iops_are_throttled_on_the_pods_devices(
    instance_daemon: Client, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    _, client = instance_daemon
    rec = client.run_instance(
        InstanceSpec(
            image=str(busybox_rootfs),
            command=(
                "sh",
                "-c",
                "time dd if=/dev/zero of=/w bs=1M count=8 oflag=direct; sleep 300",
            ),
            name="disk",
            limits=Limits(
                disk_write_bps=4 * MiB,
                disk_read_bps=4 * MiB,
                disk_write_iops=100,
            ),
        )
    )
    # the main process itself (in the pod's blkio cgroup): 8 MiB at 4 MiB/s
    deadline = time.monotonic() + 30
    log = b""
    while time.monotonic() < deadline and b"real" not in log:
        time.sleep(0.3)
        log, _, _ = client.instance_logs("disk")
    found = re.search(r"real\s+(\d+)m\s*([\d.]+)s", log.decode())
    assert found, log
    secs = int(found.group(1)) * 60 + float(found.group(2))
    assert secs > 1.6, log
    # exec'd processes: reads at 4 MiB/s, small writes at 100 IOPS
    t0 = time.monotonic()
    _sh(client, "disk", "dd if=/w of=/dev/null bs=1M iflag=direct 2>/dev/null")
    assert time.monotonic() - t0 > 1.6
    t0 = time.monotonic()
    _sh(client, "disk", "dd if=/dev/zero of=/s bs=4k count=200 oflag=direct 2>/dev/null")
    assert time.monotonic() - t0 > 1.6
    lines = (
        _pod_dir(engine_settings, rec, "blkio") / "blkio.throttle.write_bps_device"
    ).read_text()
    assert f"{4 * MiB}" in lines


@pytest.mark.parametrize(
    "instance_settings", [InstanceSettings(capacity_cpus=3, capacity_memory_bytes=6 * GiB)]
)
def test_spec_fallback_takes_the_first_spec_that_fits_and_records_it(
    instance_daemon: Client, busybox_rootfs: Path, engine_settings: EngineSettings
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    first = client.run_instance(
        InstanceSpec(image=img, command=("sleep", "300"), name="a", specs=("2c2g",))
    )
    second = client.run_instance(
        InstanceSpec(image=img, command=("sleep", "300"), name="b", specs=("2c2g", "1c1g"))
    )
    assert first["chosen"]["name"] == "2c2g" and second["chosen"]["name"] == "1c1g"
    quota = _pod_dir(engine_settings, second, "cpu") / "cpu.cfs_quota_us"
    assert quota.read_text().strip() == "100000"
    with pytest.raises(NoCapacityError) as info:
        client.run_instance(
            InstanceSpec(image=img, command=("sleep", "300"), name="c", specs=("2c2g", "1c2g"))
        )
    assert "2c2g needs 2 CPUs (free 0)" in str(info.value)
    assert "1c2g needs 1 CPUs (free 0)" in str(info.value)
    shown = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "instance", "ls"],
        env=daemon_env(engine_settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert any(ln.startswith("a ") and " 2c2g " in ln for ln in shown.splitlines()), shown
    assert any(ln.startswith("b ") and " 1c1g " in ln for ln in shown.splitlines()), shown
    assert {d["name"] for d in client.instances()} == {"a", "b"}
    # a stopped instance keeps its record but gives its share back
    assert client.stop_instance("a", 0)["status"] == "stopped"
    third = client.run_instance(
        InstanceSpec(image=img, command=("sleep", "300"), name="c", specs=("2c2g",))
    )
    assert third["chosen"]["name"] == "2c2g"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--spec", "3c7g"], "error: unknown instance spec '3c7g'; known: "),
        (["--spec", "8c32g,8c16g"], "error: no instance spec fits the node's free capacity: 8c32g"),
        (["-c", "side=/nonexistent/rootfs:sleep 9"], "/nonexistent/rootfs"),
    ],
    ids=["unknown-spec", "no-capacity", "image-missing"],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    instance_daemon: Client,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    args: list[str],
    says: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "instance", "run", "--name", "bad",
         "-p", "18099:80", "--bandwidth", "5M", *args, str(busybox_rootfs), "--", "sleep", "9"],
        env=daemon_env(engine_settings), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done
    assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert_nothing_left(engine_settings)


def test_runtime_not_installed_is_one_line_and_leaves_nothing(
    engine_settings: EngineSettings, busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    engine = Engine(engine_settings)
    try:
        with pytest.raises(ConfigError) as info:
            InstanceManager(engine, InstanceSettings()).run(
                InstanceSpec(image=str(busybox_rootfs), command=("sleep", "9"))
            )
        assert str(info.value) == "OCI runtime 'runc' is not installed; apt-get install runc"
    finally:
        monkeypatch.undo()
        cleanup_engine(engine)
    assert not pod_cgroups(engine_settings)
    assert_nothing_left(engine_settings)


def test_cli_help_explains_instances() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "instance", "run", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    for word in ("--container", "NAME[:RESTART]=IMAGE[:COMMAND]", "--spec", "fallback", "--bandwidth",
                 "--runtime", "runsc", "--pull", "--rm", "prints its name and IP"):  # fmt: skip
        assert word in done.stdout, word


def test_creation_cut_short_is_rolled_back_by_the_next_daemon(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    """The record is written before the effects: a creation that stopped after the pod's
    cgroup and sandbox were made (a daemon killed there) is undone by ``reconcile``."""
    from tidal.ids import InstanceId
    from tidal.instance.store import InstanceRecord

    engine = Engine(engine_settings)
    try:
        mgr = InstanceManager(engine, InstanceSettings())
        rec = mgr.store.put(
            InstanceRecord(
                id=InstanceId("c" * 32),
                name="cut",
                spec=InstanceSpec(image=str(busybox_rootfs), command=("sleep", "60")),
                phase="creating",
                runtime="runc",
                cgroup=f"{engine_settings.cgroup_parent}/pod-{'c' * 12}",
                created_at=time.time(),
                limits=Limits(memory_bytes=64 * MiB, egress_bps=10**7),
            )
        )
        mgr.cgroup(rec).create(rec.limits)
        sandbox = engine.run(mgr._sandbox_spec(rec))  # ... and here the daemon died
        assert sandbox.status == "running" and pod_cgroups(engine_settings)
        counts = InstanceManager(engine, InstanceSettings()).reconcile()
        assert counts == {}
        assert not engine.store.list()
        assert_nothing_left(engine_settings)
    finally:
        cleanup_engine(engine)


def test_a_runc_pod_without_a_pause_process_survives_a_reboot(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    """A runc pod's sandbox is only created (no pause process). After a host reboot took its
    network namespace and namespace files, main's next start makes them again: the same
    address on eth0, the pod's hostname, and the host reaches it."""
    engine = Engine(engine_settings)
    mgr = InstanceManager(engine, InstanceSettings())
    try:
        rec = mgr.run(
            InstanceSpec(
                image=str(busybox_rootfs),
                command=("sh", "-c", "mkdir -p /w && echo up > /w/i && exec httpd -f -p 80 -h /w"),
                name="reboot",
            )
        )
        sandbox = engine.get(rec.container_name("sandbox"))
        assert sandbox.status == "created" and not sandbox.pid and rec.ip == sandbox.ip
        main = rec.container_name("main")
        engine.stop(main, timeout_s=1)
        nsdir = engine.pod_ns_dir(sandbox.id)
        engine.pod_namespaces.destroy(nsdir)  # what a reboot takes
        engine.network.destroy_netns(sandbox.id)
        assert not engine.network.netns_exists(sandbox.id)
        assert engine.start(main).status == "running"
        assert engine.network.netns_exists(sandbox.id) and engine.pod_namespaces.exists(nsdir)
        seen = engine.exec(main, ["sh", "-c", "hostname; ip -o -4 addr show eth0"]).stdout
        name, addr = seen.decode().splitlines()
        assert name == "reboot" and f" {rec.ip}/" in addr, seen
        assert httpx.get(f"http://{rec.ip}:80/i", timeout=10).text == "up\n"
        mgr.remove(rec.id, force=True)
    finally:
        cleanup_engine(engine)
    assert_nothing_left(engine_settings)


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_members_start_before_their_sandbox_runs(
    engine_settings: EngineSettings, busybox_rootfs: Path, runtime: str
) -> None:
    """Under runc and crun the pod's IPC and UTS namespaces are files made by the sandbox's
    create: a member started while the sandbox is only created already has the pod's hostname
    and namespaces, and the sandbox joins the same ones when it starts. (Instances take runc or
    runsc; the engine's pods take crun too.)"""
    if shutil.which(runtime) is None:
        pytest.skip(f"needs {runtime}")
    engine = Engine(engine_settings)
    img = str(busybox_rootfs)
    try:
        sandbox = engine.create(
            ContainerSpec(
                image=img, command=("sleep", "300"), name="early.sandbox", hostname="early",
                network="bridge", pod_sandbox=True, disk_quotas=(QuotaSpec("/", 0),),
                runtime=runtime,
            )
        )  # fmt: skip
        nsdir = engine.pod_ns_dir(sandbox.id)
        paths = engine.pod_namespaces.paths(nsdir)
        with open("/proc/self/mountinfo") as fh:  # kept by the holder, not the host's table
            nsfs = [ln for ln in fh if " - nsfs " in ln]
        assert not [ln for ln in nsfs if "/pods/" in ln or sandbox.id[:12] in ln], nsfs
        netns = engine.network.netns_path(sandbox.id)
        assert netns.startswith("/proc/") and netns.endswith(f"/root/netns/tidal-{sandbox.id[:12]}")
        assert len(namespace_mounts(engine_settings.resolved_state_dir())) == 1  # the holder's
        assert str(paths.ipc).startswith("/proc/") and "/root/pods/" in str(paths.ipc)
        member = engine.create(
            ContainerSpec(image=img, command=("sleep", "300"), name="early.main",
                          hostname="early", sandbox="early.sandbox", runtime=runtime)
        )  # fmt: skip
        assert engine.start(member.id).status == "running"
        assert engine.get(sandbox.id).status == "created"
        script = "hostname; for n in ipc uts net; do readlink /proc/self/ns/$n; done"
        seen = engine.exec(member.id, ["sh", "-c", script]).stdout.decode().split()
        assert seen[0] == "early"
        assert _ns_inode(seen[1]) == paths.ipc.stat().st_ino
        assert _ns_inode(seen[2]) == paths.uts.stat().st_ino
        engine.start(sandbox.id)
        assert engine.exec(sandbox.id, ["sh", "-c", script]).stdout.decode().split() == seen
        engine.remove(member.id, force=True)
        engine.remove(sandbox.id, force=True)
        assert not nsdir.exists()
        assert_nothing_left(engine_settings)
    finally:
        cleanup_engine(engine)


def test_creation_cut_short_after_the_sandbox_create_is_rolled_back(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    """A daemon killed after the sandbox's create (its namespace files are made, no process
    holds them) and before any start: the next daemon's reconcile unmounts and removes them."""
    from tidal.ids import InstanceId
    from tidal.instance.store import InstanceRecord

    engine = Engine(engine_settings)
    try:
        mgr = InstanceManager(engine, InstanceSettings())
        rec = mgr.store.put(
            InstanceRecord(
                id=InstanceId("d" * 32),
                name="half",
                spec=InstanceSpec(image=str(busybox_rootfs), command=("sleep", "60")),
                phase="creating",
                runtime="runc",
                cgroup=f"{engine_settings.cgroup_parent}/pod-{'d' * 12}",
                created_at=time.time(),
            )
        )
        mgr.cgroup(rec).create(rec.limits)
        engine.create(mgr._sandbox_spec(rec))  # ... and here the daemon died
        assert namespace_mounts(engine_settings.resolved_state_dir())
        assert InstanceManager(engine, InstanceSettings()).reconcile() == {}
        assert_nothing_left(engine_settings)
    finally:
        cleanup_engine(engine)


def test_a_member_that_fails_to_start_rolls_the_pod_back(
    engine_settings: EngineSettings, busybox_rootfs: Path
) -> None:
    """The members start alongside the sandbox; one failing takes all of it back, namespace
    files included."""
    engine = Engine(engine_settings)
    try:
        mgr = InstanceManager(engine, InstanceSettings())
        with pytest.raises(OciRuntimeError, match="did not start"):
            mgr.run(
                InstanceSpec(
                    image=str(busybox_rootfs), command=("/no/such/binary",), name="doomed",
                    members=(MemberSpec("side", str(busybox_rootfs), ("sleep", "60")),),
                )
            )  # fmt: skip
        assert_nothing_left(engine_settings)
    finally:
        cleanup_engine(engine)


def test_each_container_keeps_its_own_restart_policy(
    instance_daemon: Client, busybox_rootfs: Path
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    client.run_instance(
        InstanceSpec(
            image=img,
            command=("sleep", "300"),
            name="rs",
            members=(
                MemberSpec(
                    "flaky", img, ("sh", "-c", "echo run; sleep 0.2; exit 1"), restart="always"
                ),
                MemberSpec("once", img, ("sh", "-c", "echo run; exit 1")),
            ),
        )
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if client.instance_logs("rs", "flaky")[0].count(b"run") >= 3:
            break
        time.sleep(0.2)
    assert client.instance_logs("rs", "flaky")[0].count(b"run") >= 3
    states = {c["member"]: c["status"] for c in client.instance("rs")["containers"]}
    assert states == {"sandbox": "created", "main": "running", "flaky": "running", "once": "exited"}
    assert client.instance_logs("rs", "once")[0] == b"run\n"
