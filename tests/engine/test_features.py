"""Real containers: disk quota (bytes and inodes), lxcfs, rich mode, hooks, bridge network, upgrade."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.network import host_link
from tidal.engine.spec import (
    ContainerSpec,
    HookSpec,
    ServiceSpec,
    VolumeSpec,
    parse_disk_quota,
    parse_port,
)
from tidal.errors import ConfigError, EngineError

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop]


def logs_of(engine: Engine, cid: str) -> str:
    return engine.logs(cid).data.decode(errors="replace")


def wait_for(pred, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# --- disk quota ------------------------------------------------------------------------------


def test_disk_quota_bytes_enospc_and_neighbours_unaffected(
    engine: Engine, busybox_rootfs: Path
) -> None:
    full = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "dd if=/dev/zero of=/big bs=1M count=64; echo rc=$?"),
            disk_quotas=parse_disk_quota("24M", [], 16384),
        )
    )
    full = engine.wait(full.id, 30)
    out = logs_of(engine, full.id)
    assert "No space left on device" in out
    assert "rc=0" not in out
    # the neighbour on the same host disk still writes
    other = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "dd if=/dev/zero of=/ok bs=1M count=8 2>/dev/null; echo rc=$?"),
        )
    )
    other = engine.wait(other.id, 30)
    assert logs_of(engine, other.id).strip() == "rc=0"


def test_disk_quota_inodes(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=(
                "sh",
                "-c",
                "mkdir /many; i=0; while touch /many/f$i 2>/tmp/err; do i=$((i+1)); done; "
                "echo count=$i; cat /tmp/err; df -k / | tail -1",
            ),
            disk_quotas=parse_disk_quota("64M,inodes=300", [], 16384),
        )
    )
    rec = engine.wait(rec.id, 60)
    out = logs_of(engine, rec.id)
    count = int(out.split("count=")[1].split()[0])
    # 64 MiB of bytes would hold thousands of empty files: the inode table stopped it
    assert 100 < count < 400, out
    assert "No space left on device" in out


def test_volume_gets_its_own_quota(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=(
                "sh",
                "-c",
                "dd if=/dev/zero of=/data/big bs=1M count=40 2>/dev/null; echo data=$?; "
                "dd if=/dev/zero of=/root/big bs=1M count=30 2>/dev/null; echo root=$?",
            ),
            volumes=(VolumeSpec("/data"),),
            disk_quotas=parse_disk_quota("/data=20M", ["/data"], 16384),
        )
    )
    rec = engine.wait(rec.id, 30)
    out = logs_of(engine, rec.id).split()
    assert out[0] != "data=0" and out[1] == "root=0", out


# --- lxcfs ---------------------------------------------------------------------------------


@pytest.mark.fuse
def test_free_shows_container_memory_with_lxcfs(engine: Engine, debian_rootfs: Path) -> None:
    if shutil.which("lxcfs") is None:
        pytest.skip("needs lxcfs (apt-get install lxcfs)")
    rec = engine.run(
        ContainerSpec(
            image=str(debian_rootfs),
            command=("free", "-m"),
            memory_bytes=512 * 1024 * 1024,
            lxcfs=True,
        )
    )
    rec = engine.wait(rec.id, 30)
    out = logs_of(engine, rec.id)
    mem_line = next(ln for ln in out.splitlines() if ln.startswith("Mem:"))
    assert int(mem_line.split()[1]) == 512, out
    # without lxcfs the same container sees the host's memory
    plain = engine.run(
        ContainerSpec(
            image=str(debian_rootfs), command=("free", "-m"), memory_bytes=512 << 20, lxcfs=False
        )
    )
    plain = engine.wait(plain.id, 30)
    host_line = next(ln for ln in logs_of(engine, plain.id).splitlines() if ln.startswith("Mem:"))
    assert int(host_line.split()[1]) > 512


@pytest.mark.fuse
def test_cpu_view_follows_cpus_limit_with_lxcfs(engine: Engine, busybox_rootfs: Path) -> None:
    """--cpus 1 on a multi-CPU host: nproc (the affinity mask), /proc/cpuinfo and /proc/stat
    show one CPU and /proc/loadavg is the container's own; without a limit, every CPU."""
    if shutil.which("lxcfs") is None:
        pytest.skip("needs lxcfs (apt-get install lxcfs)")
    host_cpus = len(os.sched_getaffinity(0))
    if host_cpus < 2:
        pytest.skip("needs a host with 2 or more CPUs to tell the views apart")
    host_tasks = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    script = (
        "echo nproc=$(nproc); echo cpuinfo=$(grep -c ^processor /proc/cpuinfo); "
        "echo stat=$(grep -c '^cpu[0-9]' /proc/stat); echo load=$(cat /proc/loadavg); "
        "(while :; do :; done) & sleep 6; echo busy=$(cat /proc/loadavg); kill $!"
    )

    def view(cpus: float | None) -> dict[str, str]:
        rec = engine.run(
            ContainerSpec(
                image=str(busybox_rootfs), command=("sh", "-c", script), cpus=cpus, lxcfs=True
            )
        )
        rec = engine.wait(rec.id, 60)
        out = logs_of(engine, rec.id)
        assert rec.exit_code == 0, out
        return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)

    one = view(1.0)
    assert (one["nproc"], one["cpuinfo"], one["stat"]) == ("1", "1", "1"), one
    tasks = int(one["load"].split()[3].split("/")[1])
    assert tasks < 10 and tasks < host_tasks, one  # the container's tasks, not the host's
    assert float(one["busy"].split()[0]) > 0, one  # its own busy loop raised its own load
    assert view(0.5)["nproc"] == "1"
    unlimited = view(None)
    assert unlimited["nproc"] == unlimited["cpuinfo"] == unlimited["stat"] == str(host_cpus)
    # tidal update --cpus moves the pinning with the limit
    rec = engine.run(
        ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300"), cpus=1, lxcfs=True)
    )
    assert engine.exec(rec.id, ["nproc"]).stdout == b"1\n"
    engine.update(rec.id, cpus=float(host_cpus))
    assert engine.exec(rec.id, ["nproc"]).stdout == f"{host_cpus}\n".encode()
    assert engine.exec(rec.id, ["grep", "-c", "^processor", "/proc/cpuinfo"]).stdout == (
        f"{host_cpus}\n".encode()
    )
    engine.update(rec.id, cpus=1)
    assert engine.exec(rec.id, ["nproc"]).stdout == b"1\n"


# --- rich mode and hooks ----------------------------------------------------------------------


def test_rich_init_services_restart_initscript_reaping(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "init.sh").write_text("echo init >> /scripts/initlog\n")
    main = (
        "echo run >> /scripts/main; "
        "(sleep 0.05 &); sleep 0.5; "
        "zombies=$(cat /proc/[0-9]*/stat | awk '{print $3}' | grep -c Z); echo zombies=$zombies; "
        "[ $(wc -l < /scripts/main) -ge 3 ] && exit 0 || exit 1"
    )
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", main),
            rich=True,
            restart="on-failure",
            initscript="/scripts/init.sh",
            services=(
                ServiceSpec(
                    "ticker",
                    ("sh", "-c", "echo tick >> /scripts/ticks; sleep 0.1; exit 1"),
                    "always",
                    2,
                ),
                ServiceSpec("daemonish", ("sleep", "300")),
            ),
            volumes=(VolumeSpec("/scripts", str(scripts)),),
        )
    )
    rec = engine.wait(rec.id, 30)
    out = logs_of(engine, rec.id)
    assert rec.exit_code == 0, out
    assert (scripts / "main").read_text().count("run") == 3  # restarted on failure twice
    assert (scripts / "initlog").read_text().count("init") == 3  # initscript before each start
    assert (scripts / "ticks").read_text().count("tick") == 3  # 1 start + 2 restarts
    assert out.count("zombies=0") == 3, out
    assert "restart 1/10" in out and "ticker exited with status 1" in out


def test_rich_init_forwards_sigterm(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "trap 'echo fwd-term; exit 0' TERM; while :; do sleep 0.05; done"),
            rich=True,
            services=(ServiceSpec("sleeper", ("sleep", "300")),),
        )
    )
    time.sleep(0.3)
    rec = engine.stop(rec.id, timeout_s=8)
    assert (rec.exit_code, rec.signal) == (0, None)
    assert "fwd-term" in logs_of(engine, rec.id)


def test_hooks_get_state_and_poststop_runs_after_crash(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path
) -> None:
    pre, post = tmp_path / "pre.json", tmp_path / "post.json"
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sleep", "300"),
            prestart_hooks=(HookSpec("/bin/sh", ("sh", "-c", f"cat > {pre}")),),
            poststop_hooks=(HookSpec("/bin/sh", ("sh", "-c", f"cat > {post}")),),
        )
    )
    engine.kill(rec.id, "KILL")  # a crash: nothing inside gets to clean up
    rec = engine.wait(rec.id, 20)
    assert (rec.exit_code, rec.signal) == (137, 9)
    wait_for(lambda: post.exists() and post.stat().st_size > 0)
    state = json.loads(post.read_text())
    assert state["id"] == rec.id
    pre_state = json.loads(pre.read_text())
    assert pre_state["id"] == rec.id and pre_state["pid"] > 0


# --- networking ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.netns
def test_bridge_network_ports_and_conflicts(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from tidal\n")
    port = _free_port()
    web = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("httpd", "-f", "-p", "8080", "-h", "/www"),
            name="web",
            network="bridge",
            ports=(parse_port(f"127.0.0.1:{port}:8080"),),
            volumes=(VolumeSpec("/www", str(www), readonly=True),),
        )
    )
    assert web.ip is not None and web.ip.startswith(engine.settings.subnet.rsplit(".", 2)[0])

    def fetch() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                return bool(resp.read() == b"hello from tidal\n")
        except OSError:
            return False

    wait_for(fetch)
    client = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("wget", "-qO-", f"http://{web.ip}:8080/"),
            network="bridge",
        )
    )
    client = engine.wait(client.id, 20)
    assert client.ip != web.ip
    assert logs_of(engine, client.id) == "hello from tidal\n"
    # IPv4 only: no IPv6 link-local on either end (its multicast is flooded to every port)
    v6 = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs), command=("cat", "/proc/net/if_inet6"), network="bridge"
        )
    )
    v6 = engine.wait(v6.id, 20)
    assert {line.split()[-1] for line in logs_of(engine, v6.id).splitlines()} == {"lo"}
    assert host_link(web.id) not in Path("/proc/net/if_inet6").read_text()
    with pytest.raises(ConfigError, match="already published by container web"):
        engine.run(
            ContainerSpec(
                image=str(busybox_rootfs),
                command=("true",),
                network="bridge",
                ports=(parse_port(f"127.0.0.1:{port}:80"),),
            )
        )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        with pytest.raises(ConfigError, match="in use by another process"):
            engine.run(
                ContainerSpec(
                    image=str(busybox_rootfs),
                    command=("true",),
                    network="bridge",
                    ports=(parse_port(f"127.0.0.1:{taken}:80"),),
                )
            )
    none = engine.run(
        ContainerSpec(image=str(busybox_rootfs), command=("sh", "-c", "ls /sys/class/net"))
    )
    none = engine.wait(none.id, 10)
    assert logs_of(engine, none.id).split() == ["lo"]


# --- in-place upgrade --------------------------------------------------------------------


@pytest.mark.netns
def test_upgrade_keeps_identity_and_rolls_back(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path
) -> None:
    v2 = tmp_path / "v2"
    shutil.copytree(busybox_rootfs, v2, symlinks=True)
    (v2 / "version").write_text("v2\n")
    v3 = tmp_path / "v3"
    shutil.copytree(v2, v3, symlinks=True)
    (v3 / "version").write_text("v3\n")
    cmd = ("sh", "-c", "cat /version 2>/dev/null || echo v1; echo x >> /data/count; sleep 300")
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=cmd,
            name="stateful",
            network="bridge",
            memory_bytes=64 << 20,
            volumes=(VolumeSpec("/data"),),
            disk_quotas=parse_disk_quota("/data=20M", ["/data"], 16384),
        )
    )
    wait_for(lambda: "v1" in logs_of(engine, rec.id))
    up = engine.upgrade("stateful", str(v2))
    assert (up.id, up.name, up.ip, up.status) == (rec.id, rec.name, rec.ip, "running")
    assert up.spec.image == str(v2) and up.spec.command == cmd
    assert up.spec.memory_bytes == 64 << 20 and up.spec.disk_quotas == rec.spec.disk_quotas
    wait_for(lambda: "v2" in logs_of(engine, rec.id))
    res = engine.exec(rec.id, ["cat", "/data/count"])
    assert res.stdout == b"x\nx\n"  # the volume survived
    # a new image whose command fails: rolled back to v2 and running again
    with pytest.raises(EngineError, match="rolled back"):
        engine.upgrade("stateful", str(v3), ("sh", "-c", "echo broken; exit 1"))
    back = engine.get("stateful")
    assert (back.status, back.spec.image, back.spec.command, back.ip) == (
        "running",
        str(v2),
        cmd,
        rec.ip,
    )
    wait_for(lambda: engine.exec(rec.id, ["cat", "/data/count"]).stdout == b"x\nx\nx\n")
    assert engine.exec(rec.id, ["cat", "/version"]).stdout == b"v2\n"


def test_rich_mode_image_init(engine: Engine, busybox_rootfs: Path, tmp_path: Path) -> None:
    """``--rich-mode systemd`` runs the image's own /sbin/init (busybox init here)."""
    tree = tmp_path / "with-init"
    shutil.copytree(busybox_rootfs, tree, symlinks=True)
    (tree / "sbin").mkdir(exist_ok=True)
    (tree / "sbin" / "init").symlink_to("/bin/busybox")
    (tree / "etc" / "inittab").write_text(
        "::sysinit:/bin/echo booted-by-image-init\n"
        "::once:/bin/sh -c 'echo service-up; exec sleep 300'\n"
        "::shutdown:/bin/echo shutting-down\n"
    )
    rec = engine.run(ContainerSpec(image=str(tree), rich=True, rich_mode="systemd"))
    wait_for(lambda: "service-up" in logs_of(engine, rec.id))
    rec = engine.stop(rec.id, timeout_s=10)
    out = logs_of(engine, rec.id)
    assert "booted-by-image-init" in out and "shutting-down" in out
    # busybox init "reboots" on SIGTERM; in a pid namespace that ends init with SIGHUP
    assert rec.status == "exited" and rec.exit_code is not None and rec.exit_code != 137, rec


@pytest.mark.fuse
def test_lxcfs_watchdog_restarts_a_dead_lxcfs(engine: Engine, busybox_rootfs: Path) -> None:
    import os
    import signal as sig

    if shutil.which("lxcfs") is None:
        pytest.skip("needs lxcfs")
    engine.lxcfs.ensure()
    first = engine.lxcfs.pid()
    os.kill(first, sig.SIGKILL)
    wait_for(lambda: not engine.lxcfs.healthy())
    engine.lxcfs.ensure()  # what the daemon's watchdog thread calls every few seconds
    assert engine.lxcfs.healthy() and engine.lxcfs.pid() != first
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "grep MemTotal /proc/meminfo"),
            memory_bytes=300 * 1024 * 1024,
            lxcfs=True,
        )
    )
    engine.wait(rec.id, 20)
    assert logs_of(engine, rec.id).split()[1] == str(300 * 1024)


@pytest.mark.netns
def test_restart_after_lost_mounts_and_network_keeps_address(
    engine: Engine, busybox_rootfs: Path
) -> None:
    """What a host reboot does to a stopped container: its mounts and network are gone."""
    from tidal.engine.mounter import unmount_path
    from tidal.engine.network import destroy_netns, remove_bridge

    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=(
                "sh",
                "-c",
                "echo $(cat /kept 2>/dev/null) run >> /kept; cat /kept; ip -4 addr show eth0",
            ),
            network="bridge",
        )
    )
    rec = engine.wait(rec.id, 20)
    unmount_path(Path(rec.rootfs.layer.merged))
    unmount_path(Path(rec.rootfs.volume.mountpoint))
    destroy_netns(rec.id)  # as a reboot leaves it: no netns, no veth
    remove_bridge(engine.settings.bridge)
    engine.start(rec.id)
    rec = engine.wait(rec.id, 20)
    out = logs_of(engine, rec.id)
    assert rec.exit_code == 0, out
    assert "run run" in out  # the writable layer survived on its volume
    assert out.count(f"inet {rec.ip}/") == 2


def test_upgrade_command_precedence(engine: Engine, busybox_rootfs: Path, tmp_path: Path) -> None:
    """The upgrade's command, else the container's own, else the new image's default."""
    images = {}
    for tag in ("a", "b"):
        tree = tmp_path / tag
        shutil.copytree(busybox_rootfs, tree, symlinks=True)
        (tmp_path / f"{tag}.config.json").write_text(
            json.dumps({"config": {"Cmd": ["sh", "-c", f"echo default-{tag}; sleep 300"]}})
        )
        images[tag] = str(tree)
    rec = engine.run(ContainerSpec(image=images["a"]))  # no command: image a's default
    wait_for(lambda: "default-a" in logs_of(engine, rec.id))
    engine.upgrade(rec.id, images["b"])  # still no own command: image b's default
    wait_for(lambda: "default-b" in logs_of(engine, rec.id))
    up = engine.upgrade(rec.id, images["a"], ("sh", "-c", "echo explicit; sleep 300"))
    wait_for(lambda: "explicit" in logs_of(engine, rec.id))
    assert up.spec.command == ("sh", "-c", "echo explicit; sleep 300")
    engine.upgrade(rec.id, images["b"])  # the container's own command now wins
    wait_for(lambda: logs_of(engine, rec.id).count("explicit") == 2)
    assert "default-b" in logs_of(engine, rec.id)


# --- interactive containers ----------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_terminal_through_the_monitor_under_each_runtime(
    engine: Engine, busybox_rootfs: Path, runtime: str
) -> None:
    """-i -t under runc and crun: the runtime's pty reaches the monitor's attach socket, which
    a second engine (a restarted daemon) still names; keys in, output and the exit out."""
    from tidal.engine import attach

    if shutil.which(runtime) is None:
        pytest.skip(f"needs {runtime}")
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "read x; echo got $x; tty; exit 3"),
            interactive=True,
            tty=True,
            runtime=runtime,
        )
    )
    again = Engine(engine.settings)
    try:
        path = again.inspect(rec.id)["attach_socket"]
    finally:
        again.close()
    out, exit_payload = b"", None
    with attach.connect(path) as sock:
        sock.sendall(attach.frame(attach.STDIN, b"hello\r"))
        reader = attach.FrameReader()
        while exit_payload is None:
            data = sock.recv(65536)
            if not data:
                break
            for kind, payload in reader.feed(data):
                if kind == attach.OUTPUT:
                    out += payload
                elif kind == attach.EXITED:
                    exit_payload = payload
    assert exit_payload == b"3" and b"got hello\r\n/dev/pts/0\r\n" in out, out
    assert engine.wait(rec.id, 20).exit_code == 3
    assert b"got hello" in engine.logs(rec.id).data
