"""Real containers: lifecycle, exit codes, signals, OOM, exec, update, runtimes, image rootfs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.spec import ContainerSpec
from tidal.errors import (
    ConfigError,
    ContainerNotFoundError,
    ContainerStateError,
    ImageNotFoundError,
)

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop]


def run_to_exit(
    engine: Engine, spec: ContainerSpec, timeout_s: float = 20
) -> tuple[int | None, str]:
    rec = engine.run(spec)
    rec = engine.wait(rec.id, timeout_s)
    assert rec.status == "exited", rec
    return rec.exit_code, engine.logs(rec.id).data.decode()


def test_exit_code_and_logs(engine: Engine, busybox_rootfs: Path) -> None:
    code, out = run_to_exit(
        engine,
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "echo to-out; echo to-err >&2; echo $GREETING; exit 7"),
            env=(("GREETING", "hello-env"),),
        ),
    )
    assert code == 7
    assert out.splitlines() == ["to-out", "to-err", "hello-env"]


def test_stop_sigterm_then_sigkill(engine: Engine, busybox_rootfs: Path) -> None:
    # PID 1 without a handler ignores SIGTERM: stop must escalate to SIGKILL and say so.
    stubborn = engine.run(ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300")))
    rec = engine.stop(stubborn.id, timeout_s=0.5)
    assert (rec.status, rec.exit_code, rec.signal) == ("exited", 137, 9)
    # A process that handles SIGTERM exits cleanly with its own status.
    polite = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=(
                "sh",
                "-c",
                "trap 'echo got-term; exit 3' TERM; while true; do sleep 0.05; done",
            ),
        )
    )
    rec = engine.stop(polite.id, timeout_s=10)
    assert (rec.exit_code, rec.signal) == (3, None)
    assert "got-term" in engine.logs(polite.id).data.decode()


def test_kill_reports_signal(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300")))
    engine.kill(rec.id, "KILL")
    rec = engine.wait(rec.id, 10)
    assert rec.signal == 9 and rec.exit_code == 137 and not rec.oom_killed


def test_oom_kill_reported(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("awk", 'BEGIN { s = "xxxxxxxxxxxxxxxx"; while (1) s = s s }'),
            memory_bytes=32 * 1024 * 1024,
        )
    )
    rec = engine.wait(rec.id, 30)
    assert rec.status == "exited"
    assert rec.oom_killed, rec
    assert rec.signal == 9


def test_exec_and_state_errors(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300"), name="ex1"))
    res = engine.exec("ex1", ["sh", "-c", "echo $((6*7)); cat; exit 5"], stdin=b"piped")
    assert (res.exit_code, res.stdout) == (5, b"42\npiped")
    with pytest.raises(ContainerStateError, match="already running"):
        engine.start("ex1")
    with pytest.raises(ContainerStateError, match="rm --force"):
        engine.remove("ex1")
    engine.stop("ex1", timeout_s=0)
    with pytest.raises(ContainerStateError, match="exec needs a running container"):
        engine.exec("ex1", ["true"])
    engine.remove(rec.id)
    with pytest.raises(ContainerNotFoundError):
        engine.get("ex1")


def test_restart_of_exited_container_keeps_writable_layer(
    engine: Engine, busybox_rootfs: Path
) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "echo run >> /runs; wc -l < /runs"),
        )
    )
    engine.wait(rec.id, 10)
    engine.start(rec.id)
    rec = engine.wait(rec.id, 10)
    assert rec.starts == 2
    assert engine.logs(rec.id).data.decode().split() == ["1", "2"]
    # The image directory itself was never written.
    assert not (busybox_rootfs / "runs").exists()


def test_limits_and_update_in_place(engine: Engine, busybox_rootfs: Path) -> None:
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_rootfs),
            command=("sleep", "300"),
            cpus=0.5,
            memory_bytes=128 * 1024 * 1024,
            pids_limit=50,
        )
    )
    cg = engine.cgroups_path(rec.id)
    mem = Path(f"/sys/fs/cgroup/memory{cg}/memory.limit_in_bytes")
    quota = Path(f"/sys/fs/cgroup/cpu{cg}/cpu.cfs_quota_us")
    pids = Path(f"/sys/fs/cgroup/pids{cg}/pids.max")
    assert int(mem.read_text()) == 128 * 1024 * 1024
    assert int(quota.read_text()) == 50_000
    assert pids.read_text().strip() == "50"
    rec = engine.update(rec.id, cpus=1.5, memory_bytes=256 * 1024 * 1024, pids_limit=80)
    assert int(mem.read_text()) == 256 * 1024 * 1024
    assert int(quota.read_text()) == 150_000
    assert pids.read_text().strip() == "80"
    assert (rec.spec.cpus, rec.spec.memory_bytes, rec.spec.pids_limit) == (1.5, 256 << 20, 80)
    # the pids limit is enforced: 100 background sleeps cannot all start
    res = engine.exec(
        rec.id,
        ["sh", "-c", "for i in $(seq 100); do sleep 1 </dev/null >/dev/null 2>&1 & done; echo ok"],
    )
    assert b"can't fork" in res.stderr or b"Resource temporarily unavailable" in res.stderr


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_each_runtime(engine: Engine, busybox_rootfs: Path, runtime: str) -> None:
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    rec = engine.run(
        ContainerSpec(image=str(busybox_rootfs), command=("sh", "-c", "exit 4"), runtime=runtime)
    )
    rec = engine.wait(rec.id, 10)
    assert (rec.runtime, rec.exit_code) == (runtime, 4)


def test_bad_input_fails_before_anything_is_made(engine: Engine, busybox_rootfs: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="tidal image build"):
        engine.run(ContainerSpec(image="/nonexistent/img", command=("true",)))
    with pytest.raises(ConfigError, match="no default command"):
        engine.run(ContainerSpec(image=str(busybox_rootfs)))
    from tidal.errors import OciRuntimeError

    with pytest.raises(OciRuntimeError, match=r"/no/such/binary.*no such file"):
        engine.run(ContainerSpec(image=str(busybox_rootfs), command=("/no/such/binary",)))
    # the failed run removed its row, directory, mounts and volume again
    assert engine.store.list() == []
    assert list(engine.containers_dir.iterdir()) == []


@pytest.mark.fuse
def test_tidal_image_rootfs(engine: Engine, busybox_image: Path) -> None:
    """A Tidal block image, mounted lazily read-only, with overlayfs on the quota volume."""
    rec = engine.run(
        ContainerSpec(
            image=str(busybox_image),
            command=(
                "sh",
                "-c",
                "cat /etc/passwd; echo written > /new; cat /new; mount | grep ' / '",
            ),
        )
    )
    rec = engine.wait(rec.id, 20)
    out = engine.logs(rec.id).data.decode()
    assert rec.exit_code == 0, out
    assert "root:x:0:0" in out and "written" in out and "overlay" in out
    assert rec.rootfs.layer.kind == "tidal"
    lower = Path(rec.rootfs.layer.lower_mountpoint)
    assert lower.is_mount()
    engine.remove(rec.id)
    assert lower.is_mount() == (engine.settings.hot_images > 0)  # kept hot, or released
    engine.storage.trim_hot_images(keep=0)
    assert not lower.is_mount()


@pytest.mark.fuse
def test_debian_tidal_image_with_lxcfs(engine: Engine, debian_image: Path) -> None:
    """The Debian minbase tree as a Tidal image: apt's world is there, free sees the limit."""
    rec = engine.run(
        ContainerSpec(
            image=str(debian_image),
            command=(
                "sh",
                "-c",
                "cat /etc/debian_version; free -m | grep Mem:; dpkg -l | grep -c ^ii",
            ),
            memory_bytes=256 * 1024 * 1024,
            lxcfs=True,
            runtime="crun" if shutil.which("crun") else None,
        )
    )
    rec = engine.wait(rec.id, 60)
    out = engine.logs(rec.id).data.decode().split("\n")
    assert rec.exit_code == 0, out
    assert out[0].startswith("12.")
    assert int(out[1].split()[1]) == 256
    assert int(out[2]) > 50  # packages of minbase


@pytest.mark.fuse
def test_image_mount_is_shared_kept_hot_after_its_last_user_and_released(
    engine: Engine, busybox_image: Path
) -> None:
    """One mount per image for all its containers; after the last one it stays hot (the next
    container mounts nothing) until the engine releases it."""
    from tidal.blockdev.mounts import list_mounts

    a = engine.run(ContainerSpec(image=str(busybox_image), command=("sleep", "300")))
    b = engine.run(ContainerSpec(image=str(busybox_image), command=("sleep", "300")))
    lower = Path(a.rootfs.layer.lower_mountpoint)
    assert b.rootfs.layer.lower_mountpoint == str(lower)
    assert [m.target for m in list_mounts()].count(str(lower)) == 1
    engine.remove(a.id, force=True)
    assert lower.is_mount()  # b still uses it
    assert engine.exec(b.id, ["cat", "/etc/group"]).stdout == b"root:x:0:\n"
    engine.remove(b.id, force=True)
    assert lower.is_mount() and engine.storage.hot_image_mounts() == [str(lower)]
    c = engine.run(ContainerSpec(image=str(busybox_image), command=("cat", "/etc/group")))
    assert engine.wait(c.id, 20).exit_code == 0
    assert engine.logs(c.id).data == b"root:x:0:\n"  # read through the same, still hot mount
    assert [m.target for m in list_mounts()].count(str(lower)) == 1
    engine.remove(c.id, force=True)
    assert engine.storage.trim_hot_images(keep=0) == [str(lower)]
    assert not lower.is_mount()
    assert str(lower) not in [m.target for m in list_mounts()]


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_runtime_driver_reports_unknown_containers(engine: Engine, runtime: str) -> None:
    from tidal.errors import OciRuntimeError

    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    rt = engine.runtime(runtime)
    assert rt.state("no-such-container") is None
    with pytest.raises((ContainerNotFoundError, OciRuntimeError), match="no-such-container"):
        rt.kill("no-such-container", "TERM")
    rt.delete("no-such-container")  # idempotent
    with pytest.raises((ContainerNotFoundError, OciRuntimeError), match="no-such-container"):
        rt.update("no-such-container", {"memory": {"limit": 1 << 30}})
