"""gVisor's runsc as a Tidal runtime: its kernel, the engine's limits, images, pods, features.

Pure tests first (flag choice, settings, refs); the rest run real sandboxes and need root,
runsc and the busybox tree. Every engine fixture checks that no mount, loop device, cgroup or
netns is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tidal.engine.bundle import BundleInputs, build_config, write_bundle
from tidal.engine.containers import Engine
from tidal.engine.monitor import ExitRecord, read_exit_record
from tidal.engine.runtime import (
    POD_CONTAINER_TYPE,
    POD_SANDBOX_ID,
    RUNSC_DEFAULT_OPTIONS,
    RunscRuntime,
    RuntimeRef,
    get_runtime,
    open_runtime,
    runsc_network,
)
from tidal.engine.settings import EngineSettings
from tidal.engine.spec import ContainerSpec, HookSpec, PortMapping, ServiceSpec
from tidal.errors import ConfigError
from tidal.testing.daemon import daemon_env, start_daemon
from tidal.testing.engine import FakeRuntime

F = TypeVar("F", bound=Callable[..., object])
GVISOR_BANNER = "Starting gVisor"


def real(fn: F) -> F:
    """Marks of a test that runs real sandboxes (skipped with the reason, or failed under
    TIDAL_REQUIRE_ALL, where the capability is missing)."""
    for mark in (pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop):
        fn = mark(fn)
    return fn


@pytest.fixture
def runsc() -> str:
    path = shutil.which("runsc")
    if path is None:
        pytest.skip("runsc is not installed (apt-get install runsc)")
    return path


# --- pure ----------------------------------------------------------------------------------


def test_network_flag_follows_the_bundle() -> None:
    def cfg(*namespaces: dict[str, str]) -> dict[str, object]:
        return {"linux": {"namespaces": [{"type": "pid"}, *namespaces]}}

    assert runsc_network(cfg({"type": "network"})) == "none"
    assert runsc_network(cfg({"type": "network", "path": "/var/run/netns/x"})) == "host"
    assert runsc_network(cfg()) == "host"


def test_settings_choose_runsc_and_check_its_flags() -> None:
    s = EngineSettings(runtime="runsc", runsc_flags=("--platform=kvm",))
    assert s.runtime_options("runsc") == ("--platform=kvm",)
    assert s.runtime_options("runc") == ()
    for bad in ("--network=sandbox", "--root=/x", "platform=kvm"):
        with pytest.raises(ConfigError, match="runsc_flags"):
            EngineSettings(runsc_flags=(bad,))


def test_environment_sets_runsc_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tidal.engine.settings import load_settings

    (tmp_path / "tidal.toml").write_text("[engine]\n")
    monkeypatch.setenv("TIDAL_CONFIG", str(tmp_path / "tidal.toml"))
    monkeypatch.setenv("TIDAL_ENGINE__RUNTIME", "runsc")
    monkeypatch.setenv("TIDAL_ENGINE__RUNSC_FLAGS", "--platform=kvm,--debug")
    s = load_settings()
    assert s.runtime == "runsc" and s.runsc_flags == ("--platform=kvm", "--debug")


def test_ref_carries_the_flags_to_the_monitor(runsc: str, tmp_path: Path) -> None:
    rt = get_runtime("runsc", tmp_path, options=("--platform=kvm",))
    assert isinstance(rt, RunscRuntime)
    assert rt.options == (*RUNSC_DEFAULT_OPTIONS, "--platform=kvm")
    ref = RuntimeRef.from_json(json.loads(json.dumps(rt.ref().to_json())))
    again = open_runtime(ref)
    assert isinstance(again, RunscRuntime) and again.options == rt.options
    assert again.global_args()[:3] == [runsc, "--root", str(tmp_path / "runtime" / "runsc")]
    plain = get_runtime("runsc", tmp_path)
    assert isinstance(plain, RunscRuntime) and plain.options == RUNSC_DEFAULT_OPTIONS


def test_state_files_are_found_by_gvisors_naming(runsc: str, tmp_path: Path) -> None:
    """``<container id>_sandbox:<sandbox id>.state`` (gVisor's ``state_file.go``): a pod
    member's file is found by its own id, not by its sandbox's."""
    rt = get_runtime("runsc", tmp_path)
    assert isinstance(rt, RunscRuntime)
    (rt.root / "pod_sandbox:pod.state").write_text('{"id": "pod", "goferPid": 11}')
    (rt.root / "app_sandbox:pod.state").write_text('{"id": "app", "goferPid": 12}')
    (rt.root / "app_sandbox:pod.lock").write_text("")
    assert rt._saved_state("pod")["goferPid"] == 11
    assert rt._saved_state("app")["goferPid"] == 12
    assert rt.knows("app") and not rt.knows("ap") and not rt.knows("a*") and not rt.knows("")


def test_missing_runsc_binary_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'/no/runsc' is not an executable.*runsc_binary"):
        get_runtime("runsc", tmp_path, binary="/no/runsc")


def test_pod_annotations(runsc: str, tmp_path: Path) -> None:
    rt = RunscRuntime(tmp_path)
    assert rt.pod_annotations("s1", is_sandbox=True) == {
        POD_CONTAINER_TYPE: "sandbox",
        POD_SANDBOX_ID: "s1",
    }
    assert rt.pod_annotations("s1", is_sandbox=False)[POD_CONTAINER_TYPE] == "container"
    runc = get_runtime("runc", tmp_path) if shutil.which("runc") else None
    if runc is not None:
        assert runc.pod_annotations("s1", is_sandbox=False) == {}


class FakeSandboxRuntime(FakeRuntime):
    """The fake with runsc's declared differences, so the engine's refusals are tested
    without root; its monitors rebuild the plain fake (same verbs)."""

    capabilities = dataclasses.replace(
        FakeRuntime.capabilities,
        update=False,
        update_pids=False,
        own_proc_view=True,
        pod_sandbox=True,
    )

    def ref(self) -> RuntimeRef:
        return RuntimeRef("tidal.testing.engine:FakeRuntime", str(self.root))


def test_engine_follows_the_runtimes_capabilities_without_root(tmp_path: Path) -> None:
    from tidal.testing.engine import FakeMounter, FakeNetwork, fake_rootfs

    eng = Engine(
        EngineSettings(
            state_dir=tmp_path / "engine",
            default_disk_quota_bytes=0,
            lxcfs="on",
            volume_pool_size=0,
            stop_timeout_s=2.0,
        ),
        runtime_factory=lambda name, state_dir: FakeSandboxRuntime(state_dir / "fake"),
        mounter=FakeMounter(tmp_path / "host"),
        network=FakeNetwork(tmp_path / "host"),
    )
    image = str(fake_rootfs(tmp_path / "img"))
    try:
        with pytest.raises(ConfigError, match="drop --lxcfs"):
            eng.run(ContainerSpec(image=image, lxcfs=True, command=("sleep", "30")))
        assert eng.store.list() == []
        rec = eng.run(ContainerSpec(image=image, command=("sleep", "30")))
        config = json.loads((eng.cdir(rec.id) / "bundle" / "config.json").read_text())
        assert not any(m["destination"] == "/proc/meminfo" for m in config["mounts"])
        with pytest.raises(ConfigError, match="cannot change the limits of running"):
            eng.update(rec.id, cpus=0.5)
        assert eng.get(rec.id).spec.cpus is None
        eng.stop(rec.id, timeout_s=0.2)
        assert eng.update(rec.id, cpus=0.5).spec.cpus == 0.5
    finally:
        for r in eng.store.list():
            eng.remove(r.id, force=True)
        eng.close()


# --- real sandboxes through the engine -----------------------------------------------------


def run_to_exit(engine: Engine, spec: ContainerSpec, timeout_s: float = 30) -> tuple[int, str]:
    rec = engine.wait(engine.run(spec).id, timeout_s)
    assert rec.status == "exited", rec
    assert rec.exit_code is not None, rec
    return rec.exit_code, engine.logs(rec.id).data.decode()


def fetch(url: str, timeout_s: float = 15) -> bytes:
    """GET with retries: a sandbox's server is up a moment after the container is running."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                data: bytes = resp.read()
                return data
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cgroup_file(engine: Engine, cid: str, controller: str, name: str) -> Path:
    return Path("/sys/fs/cgroup") / controller / engine.cgroups_path(cid).lstrip("/") / name


@real
def test_gvisor_kernel_and_the_engines_limits(
    engine: Engine, busybox_rootfs: Path, runsc: str
) -> None:
    code, out = run_to_exit(
        engine,
        ContainerSpec(
            image=str(busybox_rootfs),
            runtime="runsc",
            memory_bytes=128 << 20,
            cpus=0.5,
            command=(
                "sh",
                "-c",
                "dmesg | head -1; uname -r; grep MemTotal /proc/meminfo; nproc; "
                "cut -d' ' -f1-3 /proc/loadavg",
            ),
        ),
    )
    lines = out.splitlines()
    assert code == 0 and GVISOR_BANNER in lines[0], out
    assert lines[1] != os.uname().release, "uname -r is the host's: not gVisor's kernel"
    assert lines[2].split()[1:] == ["131072", "kB"], "gVisor's /proc/meminfo shows --memory"
    assert lines[3] == "2", "nproc: --cpus 0.5 rounded up, at least gVisor's floor of 2"
    assert lines[4] == "0.00 0.00 0.00", "the sandbox's own load average, not the host's"

    # --cpus 0.5 holds: a busy loop gets half a core from the host's CFS quota.
    busy = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            runtime="runsc",
            cpus=0.5,
            command=("sh", "-c", "while :; do :; done"),
        )
    )
    usage = cgroup_file(engine, busy.id, "cpuacct", "cpuacct.usage")
    assert cgroup_file(engine, busy.id, "cpu", "cpu.cfs_quota_us").read_text().strip() == "50000"
    time.sleep(0.5)
    u0, t0 = int(usage.read_text()), time.monotonic()
    time.sleep(2.0)
    cores = (int(usage.read_text()) - u0) / 1e9 / (time.monotonic() - t0)
    engine.remove(busy.id, force=True)
    assert 0.2 < cores < 0.65, f"a --cpus 0.5 sandbox used {cores:.2f} cores"

    # --memory holds: the host's memory cgroup kills a sandbox that outgrows it.
    rec = engine.wait(
        engine.run(
            ContainerSpec(
                image=str(busybox_rootfs),
                runtime="runsc",
                memory_bytes=64 << 20,
                command=("awk", 'BEGIN { s = "xxxxxxxxxxxxxxxx"; while (1) s = s s }'),
            )
        ).id,
        60,
    )
    assert (rec.status, rec.exit_code, rec.oom_killed) == ("exited", 137, True), rec


@real
@pytest.mark.fuse
@pytest.mark.registry
def test_tidal_images_lazy_and_local_under_runsc(
    engine: Engine,
    busybox_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runsc: str,
) -> None:
    from tidal.blobs.distribution import pull_image, push_image
    from tidal.blobs.reference import ImageReference
    from tidal.blobs.registry_client import RegistryClient
    from tidal.testing.registry_server import RegistryServer

    probe = ("sh", "-c", "dmesg | head -1; ls /bin | wc -l; echo w > /written; cat /written")
    code, out = run_to_exit(
        engine, ContainerSpec(image=str(busybox_image), runtime="runsc", command=probe)
    )
    lines = out.split("\n")
    assert code == 0 and GVISOR_BANNER in lines[0] and int(lines[1]) > 100, out
    assert lines[2] == "w"

    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(tmp_path / "chunks"))
    with RegistryServer() as server, RegistryClient(server.address) as client:
        ref = ImageReference.parse(f"{server.address}/engine/busybox:runsc")
        push_image(busybox_image, ref, client)
        pulled = tmp_path / "pulled"
        pull_image(ref, pulled, client)
        assert not (pulled / "blobs").exists(), "the pull fetched layer data"
        code, out = run_to_exit(
            engine, ContainerSpec(image=str(pulled), runtime="runsc", command=probe)
        )
    assert code == 0 and GVISOR_BANNER in out and int(out.split("\n")[1]) > 100, out
    assert any((tmp_path / "chunks").rglob("*")), "the image's chunks came through the cache"


@real
def test_published_port_exec_and_upgrade_under_runsc(
    engine: Engine, busybox_rootfs: Path, runsc: str
) -> None:
    port = 20000 + os.getpid() % 20000

    def serve(text: str) -> tuple[str, ...]:
        return ("sh", "-c", f"mkdir -p /www; echo {text} > /www/i; exec httpd -f -p 80 -h /www")

    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            runtime="runsc",
            network="bridge",
            ports=(PortMapping(port, 80),),
            command=serve("v1"),
        )
    )
    assert fetch(f"http://127.0.0.1:{port}/i") == b"v1\n"
    res = engine.exec(rec.id, ["sh", "-c", "dmesg | head -1; ip -4 addr show eth0"])
    assert res.exit_code == 0 and GVISOR_BANNER.encode() in res.stdout, res
    assert rec.ip is not None and rec.ip.encode() in res.stdout, "exec is not in its netns"
    up = engine.upgrade(rec.id, str(busybox_rootfs), serve("v2"))
    assert (up.status, up.ip, up.runtime) == ("running", rec.ip, "runsc")
    assert fetch(f"http://127.0.0.1:{port}/i") == b"v2\n"


@real
def test_rich_mode_hooks_and_disk_quota_under_runsc(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path, runsc: str
) -> None:
    marks = tmp_path / "hooks.txt"

    def hook(word: str) -> HookSpec:
        return HookSpec("/bin/sh", ("sh", "-c", f"echo {word} >> {marks}"))

    code, out = run_to_exit(
        engine,
        ContainerSpec(
            image=str(busybox_rootfs),
            runtime="runsc",
            rich=True,
            services=(ServiceSpec("svc", ("sh", "-c", "echo svc-ran > /tmp/svc; sleep 30")),),
            command=("sh", "-c", "sleep 1; cat /tmp/svc; dmesg | head -1"),
            prestart_hooks=(hook("pre"),),
            poststop_hooks=(hook("post"),),
        ),
    )
    assert code == 0 and "svc-ran" in out and GVISOR_BANNER in out, out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "post" not in (
        marks.read_text() if marks.exists() else ""
    ):
        time.sleep(0.05)
    assert marks.read_text().split() == ["pre", "post"]

    # The rootfs writes go through the gofer to the overlay on the 64 MiB quota volume.
    code, out = run_to_exit(
        engine,
        ContainerSpec(
            image=str(busybox_rootfs),
            runtime="runsc",
            command=("sh", "-c", "dd if=/dev/zero of=/big bs=1M count=100; echo dd=$?"),
        ),
    )
    assert "dd=1" in out and "No space left on device" in out, out


@real
def test_what_runsc_cannot_do_is_refused_in_one_line(
    engine: Engine, busybox_rootfs: Path, runsc: str
) -> None:
    bb = str(busybox_rootfs)
    missing = Engine(dataclasses.replace(engine.settings, runsc_binary="/no/runsc"))
    try:
        with pytest.raises(ConfigError, match="'/no/runsc' is not an executable") as info:
            missing.run(ContainerSpec(image=bb, runtime="runsc", command=("true",)))
        assert "\n" not in str(info.value) and missing.store.list() == []
    finally:
        missing.close()
    with pytest.raises(ConfigError, match="drop --lxcfs") as info:
        engine.run(ContainerSpec(image=bb, runtime="runsc", lxcfs=True, command=("true",)))
    assert "\n" not in str(info.value)
    assert engine.store.list() == [] and list(engine.containers_dir.iterdir()) == []

    rec = engine.run(
        ContainerSpec(image=bb, runtime="runsc", memory_bytes=96 << 20, command=("sleep", "60"))
    )
    with pytest.raises(ConfigError, match="stop it, 'tidal update' it") as info:
        engine.update(rec.id, memory_bytes=200 << 20)
    assert "\n" not in str(info.value)
    after = engine.get(rec.id)
    assert after.status == "running" and after.spec.memory_bytes == 96 << 20
    limit = cgroup_file(engine, rec.id, "memory", "memory.limit_in_bytes")
    assert int(limit.read_text()) == 96 << 20
    # Stopped, the same update is recorded and holds from the next start.
    engine.stop(rec.id, timeout_s=0.5)
    engine.update(rec.id, memory_bytes=200 << 20)
    engine.start(rec.id)
    res = engine.exec(rec.id, ["grep", "MemTotal", "/proc/meminfo"])
    assert res.stdout.split()[1:] == [b"204800", b"kB"], res


@real
def test_default_runtime_setting_and_no_lxcfs_under_runsc(
    engine_settings: EngineSettings,
    busybox_rootfs: Path,
    engine_cleanup: Callable[[Engine], None],
    runsc: str,
) -> None:
    eng = Engine(dataclasses.replace(engine_settings, runtime="runsc", lxcfs="on"))
    try:
        rec = eng.run(
            ContainerSpec(
                image=str(busybox_rootfs),
                memory_bytes=100 << 20,
                command=("sh", "-c", "dmesg | head -1; grep MemTotal /proc/meminfo"),
            )
        )
        assert rec.runtime == "runsc"
        rec = eng.wait(rec.id, 30)
        out = eng.logs(rec.id).data.decode()
        assert GVISOR_BANNER in out and "102400 kB" in out, out
        config = json.loads((eng.cdir(rec.id) / "bundle" / "config.json").read_text())
        binds = [m["destination"] for m in config["mounts"]]
        assert "/proc/meminfo" not in binds, "lxcfs was bound into a gVisor sandbox"
    finally:
        engine_cleanup(eng)


# --- pods ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Pod:
    """A runsc root for pod tests and the containers made in it (deleted afterwards)."""

    rt: RunscRuntime
    made: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture
def pod(tmp_path: Path, busybox_rootfs: Path, runsc: str) -> Iterator[Pod]:
    rt = RunscRuntime(tmp_path / "state")
    made: list[str] = []
    try:
        yield Pod(rt, made)
    finally:
        for cid in reversed(made):
            with contextlib.suppress(Exception):
                rt.delete(cid, force=True)
        left = [cid for cid in made if rt.state(cid) is not None]
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            for cid in made:
                with contextlib.suppress(OSError):
                    (ctrl / "tidal-pod-test" / cid).rmdir()
            with contextlib.suppress(OSError):
                (ctrl / "tidal-pod-test").rmdir()
        assert not left, f"containers left behind: {left}"


def _pod_member(
    pod: Pod, rootfs: Path, work: Path, cid: str, args: tuple[str, ...], ann: dict[str, str]
) -> Path:
    """Start ``cid`` through a real container monitor, as the engine does; returns its dir."""
    from tidal.engine.launcher import hand_over, launch_monitor
    from tidal.engine.monitor import MonitorConfig

    cfg = build_config(
        ContainerSpec(image=str(rootfs), command=args),
        BundleInputs(
            container_id=cid,
            rootfs=str(rootfs),
            args=args,
            cgroups_path=f"/tidal-pod-test/{cid}",
        ),
    )
    cfg["root"]["readonly"] = True
    cfg["annotations"].update(ann)
    cdir = work / cid
    write_bundle(cdir / "bundle", cfg)
    pod.made.append(cid)
    conf = MonitorConfig(
        id=cid,
        runtime=pod.rt.ref(),
        bundle=str(cdir / "bundle"),
        start_seq=1,
        cdir=str(cdir),
        cgroup=f"/tidal-pod-test/{cid}",
    )
    report = hand_over(conf, launch_monitor())
    assert report.ok, report
    return cdir


def _exit_record(cdir: Path, timeout_s: float = 20) -> ExitRecord:
    deadline = time.monotonic() + timeout_s
    while (rec := read_exit_record(cdir)) is None:
        assert time.monotonic() < deadline, f"no exit.json in {cdir}"
        time.sleep(0.02)
    return rec


@real
def test_pod_members_share_one_gvisor_sandbox(
    pod: Pod, busybox_rootfs: Path, tmp_path: Path
) -> None:
    rt = pod.rt
    work = tmp_path / "pod"
    infra_dir = _pod_member(
        pod,
        busybox_rootfs,
        work,
        "infra",
        ("sh", "-c", "echo infra-up; exec httpd -f -p 8080 -h /etc"),
        rt.pod_annotations("infra", is_sandbox=True),
    )
    time.sleep(0.3)
    app_dir = _pod_member(
        pod,
        busybox_rootfs,
        work,
        "app",
        ("sh", "-c", "wget -q -O- http://127.0.0.1:8080/passwd | head -1; exit 3"),
        rt.pod_annotations("infra", is_sandbox=False),
    )
    infra = rt.state("infra")
    assert infra is not None and infra.status == "running"
    assert int((app_dir / "pid").read_text()) == infra.pid, "the member has a sandbox of its own"
    # The member's monitor waited for the member alone (runsc wait), not for the sandbox.
    assert _exit_record(app_dir).exit_code == 3
    out = (app_dir / "container.log").read_text().splitlines()
    assert out and out[0].startswith("root:x:0:0"), f"the pod's localhost is not shared: {out}"
    sandboxes = {json.loads(p.read_text())["sandbox"]["id"] for p in rt.root.glob("*.state")}
    assert sandboxes == {"infra"}, sandboxes
    st = rt.state("infra")
    assert st is not None and st.status == "running", "the member's exit ended the pod"
    assert (infra_dir / "container.log").read_text() == "infra-up\n"
    # the driver finds a running member's own state file (its gofer is reaped by its
    # monitor from there, else the member's delete waits out runsc's 5 s for the zombie)
    _pod_member(
        pod, busybox_rootfs, work, "idle", ("sleep", "60"),
        rt.pod_annotations("infra", is_sandbox=False),
    )  # fmt: skip
    assert rt.knows("idle") and isinstance(rt._saved_state("idle").get("goferPid"), int)
    rt.kill("idle", "KILL")
    assert _exit_record(work / "idle").exit_code == 137
    rt.kill("infra", "KILL")
    assert _exit_record(infra_dir).exit_code == 137


# --- the CLI through the daemon ------------------------------------------------------------


def _cli(settings: EngineSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", *args],
        env=daemon_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@real
def test_cli_run_runtime_runsc_through_the_daemon_and_its_sigkill(
    engine_settings: EngineSettings,
    busybox_rootfs: Path,
    tmp_path: Path,
    engine_cleanup: Callable[[Engine], None],
    runsc: str,
) -> None:
    log = tmp_path / "daemon.log"
    proc = start_daemon(engine_settings, log)
    bb = str(busybox_rootfs)
    try:
        r = _cli(
            engine_settings,
            "run",
            "--runtime",
            "runsc",
            bb,
            "--",
            "sh",
            "-c",
            "dmesg | head -1; exit 4",
        )
        assert r.returncode == 4 and GVISOR_BANNER in r.stdout, (r.stdout, r.stderr)
        r = _cli(
            engine_settings,
            "run",
            "-d",
            "--runtime",
            "runsc",
            "--name",
            "long",
            bb,
            "--",
            "sleep",
            "300",
        )
        assert r.returncode == 0, r.stderr
        r = _cli(engine_settings, "update", "long", "--memory", "200M")
        assert r.returncode == 1 and r.stderr.startswith("error: runtime runsc cannot change")
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start_daemon(engine_settings, log)
        r = _cli(engine_settings, "ps", "-a")
        row = next(ln for ln in r.stdout.splitlines() if " long " in f" {ln} ")
        assert "runsc" in row and "running" in row, r.stdout
        r = _cli(engine_settings, "exec", "long", "--", "sh", "-c", "dmesg | head -1")
        assert GVISOR_BANNER in r.stdout, r.stderr
        r = _cli(engine_settings, "stop", "-t", "0.5", "long")
        assert r.returncode == 0, r.stderr
        r = _cli(engine_settings, "rm", "long")
        assert r.returncode == 0, r.stderr
    finally:
        from tidal.engine.client import EngineClient
        from tidal.errors import DaemonUnavailableError

        with (
            EngineClient(engine_settings.resolved_socket_path()) as c,
            contextlib.suppress(DaemonUnavailableError),
        ):
            for rec in c.list_all():
                c.remove(rec.id, force=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine_cleanup(Engine(engine_settings))


@real
def test_network_modes_and_signals_under_runsc(
    engine: Engine, busybox_rootfs: Path, runsc: str
) -> None:
    bb = str(busybox_rootfs)
    names = "ip -o link | cut -d: -f2 | tr -d ' ' | sort | tr '\\n' ,"
    code, out = run_to_exit(
        engine,
        ContainerSpec(image=bb, runtime="runsc", network="none", command=("sh", "-c", names)),
    )
    assert (code, out.strip()) == (0, "lo,"), "--network none is gVisor's loopback-only netstack"
    code, out = run_to_exit(
        engine,
        ContainerSpec(image=bb, runtime="runsc", network="host", command=("sh", "-c", names)),
    )
    host_links = {p.name for p in Path("/sys/class/net").iterdir()}
    assert code == 0 and set(out.strip().strip(",").split(",")) <= host_links, out
    assert len(out.split(",")) > 2, "--network host does not see the host's interfaces"

    # gVisor's PID 1 has no shield against default-action signals: TERM ends a handler-less
    # init at once (runc's ignores it until SIGKILL), and a signal death is the sandbox's
    # exit code 128+n, with no signal recorded.
    rec = engine.run(ContainerSpec(image=bb, runtime="runsc", command=("sleep", "300")))
    t0 = time.monotonic()
    rec = engine.stop(rec.id, timeout_s=5)
    assert (rec.exit_code, rec.signal) == (143, None) and time.monotonic() - t0 < 4, rec
    rec = engine.run(ContainerSpec(image=bb, runtime="runsc", command=("sleep", "300")))
    engine.kill(rec.id, "KILL")
    rec = engine.wait(rec.id, 10)
    assert (rec.exit_code, rec.signal) == (137, None), rec


@real
@pytest.mark.fuse
@pytest.mark.registry
def test_cli_runs_a_lazy_tidal_image_under_runsc_through_the_daemon(
    engine_settings: EngineSettings,
    busybox_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine_cleanup: Callable[[Engine], None],
    runsc: str,
) -> None:
    from tidal.blobs.distribution import pull_image, push_image
    from tidal.blobs.reference import ImageReference
    from tidal.blobs.registry_client import RegistryClient
    from tidal.testing.registry_server import RegistryServer

    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(tmp_path / "chunks"))
    with RegistryServer() as server, RegistryClient(server.address) as client:
        ref = ImageReference.parse(f"{server.address}/engine/busybox:lazy")
        push_image(busybox_image, ref, client)
        pulled = tmp_path / "pulled"
        pull_image(ref, pulled, client)
        proc = start_daemon(engine_settings, tmp_path / "daemon.log")
        try:
            r = _cli(
                engine_settings,
                "run",
                "--rm",
                "--runtime",
                "runsc",
                str(pulled),
                "--",
                "sh",
                "-c",
                "dmesg | head -1; ls /bin | wc -l",
            )
            assert r.returncode == 0, r.stderr
            banner, count = r.stdout.splitlines()
            assert GVISOR_BANNER in banner and int(count) > 100, r.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            engine_cleanup(Engine(engine_settings))
    assert any((tmp_path / "chunks").rglob("*")), "the image's chunks came through the cache"
