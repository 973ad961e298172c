"""The daemon's API over its unix socket, the CLI against it, and survival of a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon, status_for
from tidal.engine.settings import EngineSettings
from tidal.engine.spec import ContainerSpec
from tidal.errors import (
    ConfigError,
    ContainerNotFoundError,
    ContainerStateError,
    DaemonUnavailableError,
    EngineError,
)
from tidal.testing.daemon import daemon_env, start_daemon


def test_status_table() -> None:
    assert status_for(ContainerNotFoundError("x")) == 404
    assert status_for(ContainerStateError("x")) == 409
    assert status_for(ConfigError("x")) == 400
    assert status_for(DaemonUnavailableError("x")) == 503
    assert status_for(EngineError("x")) == 500


def test_client_without_daemon(tmp_path: Path) -> None:
    with (
        EngineClient(tmp_path / "none.sock") as c,
        pytest.raises(DaemonUnavailableError, match="tidal daemon"),
    ):
        c.ping()


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.loop
def test_api_round_trip(daemon: tuple[Daemon, EngineClient], busybox_rootfs: Path) -> None:
    d, c = daemon
    assert c.ping()["pid"] == os.getpid()
    rec = c.run(
        ContainerSpec(
            image=str(busybox_rootfs), command=("sh", "-c", "echo hi; sleep 300"), name="api1"
        )
    )
    assert rec.status == "running"
    assert [r.name for r in c.list_all()] == ["api1"]
    res = c.exec("api1", ["sh", "-c", "echo $X"], env=["X=from-exec"])
    assert (res.exit_code, res.stdout) == (0, b"from-exec\n")
    with pytest.raises(ContainerStateError, match="rm --force"):
        c.remove("api1")
    with pytest.raises(ContainerNotFoundError, match="tidal ps"):
        c.inspect("nope")
    info = c.inspect("api1")
    assert info["disk"]["bytes_total"] > 0 and info["disk"]["inodes_total"] > 0
    rec = c.stop("api1", timeout_s=0.2)
    assert rec.signal == 9
    assert b"".join(c.follow_logs("api1")) == b"hi\n"
    # the engine's own class (ConfigError: the name is the caller's input), not a wrapper
    with pytest.raises(ConfigError, match=r"^a container named 'api1' already exists"):
        c.run(ContainerSpec(image=str(busybox_rootfs), command=("true",), name="api1"))
    c.remove("api1")
    assert c.list_all() == []
    created = c.run(
        ContainerSpec(image=str(busybox_rootfs), command=("echo", "later")), start=False
    )
    assert created.status == "created" and Path(created.rootfs.layer.merged).is_mount()
    assert c.wait(c.start(created.id).id, 10).exit_code == 0
    c.remove(created.id)
    # a second daemon on the same state directory is refused
    with pytest.raises(EngineError, match="another tidal daemon"):
        Daemon(d.settings)


def _cli(settings: EngineSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", *args],
        env=daemon_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.loop
def test_cli_and_sigkilled_daemon_restart(
    engine_settings: EngineSettings,
    busybox_rootfs: Path,
    tmp_path: Path,
    engine_cleanup: Callable[[Engine], None],
) -> None:
    log = tmp_path / "daemon.log"
    proc = start_daemon(engine_settings, log)
    try:
        bb = str(busybox_rootfs)
        r = _cli(
            engine_settings, "run", "--name", "fg", bb, "--", "sh", "-c", "echo foreground; exit 3"
        )
        assert (r.returncode, r.stdout) == (3, "foreground\n"), r.stderr
        r = _cli(
            engine_settings,
            "run",
            "-d",
            "--name",
            "quick",
            bb,
            "--",
            "sh",
            "-c",
            "echo q; sleep 1; exit 5",
        )
        assert r.returncode == 0, r.stderr
        r = _cli(
            engine_settings,
            "run",
            "-d",
            "--name",
            "long",
            "-l",
            "tier=web",
            bb,
            "--",
            "sleep",
            "300",
        )
        assert r.returncode == 0, r.stderr
        r = _cli(engine_settings, "rm", "nope")
        assert r.returncode == 1 and r.stderr.startswith("error: no container 'nope'")
        assert "Traceback" not in r.stderr

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(1.5)  # "quick" exits while no daemon runs
        proc = start_daemon(engine_settings, log)

        r = _cli(engine_settings, "ps", "-a")
        lines = {ln.split()[1]: ln for ln in r.stdout.splitlines()[1:]}
        assert "exited (3)" in lines["fg"]
        assert "exited (5)" in lines["quick"]
        assert "running" in lines["long"]
        r = _cli(engine_settings, "ps", "-a", "--label", "tier=web")
        assert [ln.split()[1] for ln in r.stdout.splitlines()[1:]] == ["long"], r.stdout
        r = _cli(engine_settings, "ps", "--label", "tier")
        assert r.returncode == 1 and "expected KEY=VALUE" in r.stderr
        assert _cli(engine_settings, "logs", "quick").stdout == "q\n"
        r = _cli(engine_settings, "exec", "long", "--", "echo", "still-here")
        assert r.stdout == "still-here\n"
        r = _cli(engine_settings, "update", "long", "--memory", "200M", "--cpus", "0.5")
        assert r.returncode == 0 and "memory=209715200" in r.stdout, r.stderr
        info = json.loads(_cli(engine_settings, "inspect", "long").stdout)
        assert info["spec"]["memory_bytes"] == 200 << 20 and info["status"] == "running"
        r = _cli(engine_settings, "stop", "-t", "0.2", "long")
        assert "137" in r.stdout and "SIGKILL" in r.stdout
        r = _cli(engine_settings, "rm", "fg", "quick", "long")
        assert r.returncode == 0, r.stderr
    finally:
        with EngineClient(engine_settings.resolved_socket_path()) as c:
            try:
                for rec in c.list_all():
                    c.remove(rec.id, force=True)
            except DaemonUnavailableError:
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine_cleanup(Engine(engine_settings))
