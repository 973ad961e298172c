"""The engine corrections of issue 12 through the real daemon and CLI: quoted service and
hook commands, services that give up, ``ps -q``, ``logs -f``/``--tail``, ``upgrade -t``."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.engine.containers import Engine
from tidal.engine.settings import EngineSettings
from tidal.errors import ConfigError, DaemonUnavailableError
from tidal.testing.daemon import daemon_env, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop]


def cli(settings: EngineSettings, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", *args],
        env=daemon_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


def wait_for(pred: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def tidal_daemon(
    engine_settings: EngineSettings, tmp_path: Path, engine_cleanup: Callable[[Engine], None]
) -> Iterator[EngineSettings]:
    """``tidal daemon`` as a child process; every container removed and leak-checked after."""
    proc = start_daemon(engine_settings, tmp_path / "daemon.log")
    try:
        yield engine_settings
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


def test_quoted_service_and_hook_commands(
    tidal_daemon: EngineSettings, busybox_rootfs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = cli(
        tidal_daemon,
        "run",
        "-d",
        "--name",
        "quoted",
        "--rich",
        "-v",
        f"{out}:/out",
        "--service",
        """writer=sh -c 'echo "two  spaces" > /out/svc; sleep 300'""",
        "--hook-prestart",
        f"/bin/sh -c 'echo \"pre hook\" > {out}/hook'",
        str(busybox_rootfs),
        "--",
        "sleep",
        "300",
    )
    assert r.returncode == 0, r.stderr
    wait_for(lambda: (out / "svc").exists() and (out / "svc").stat().st_size > 0)
    assert (out / "svc").read_text() == "two  spaces\n"  # split at spaces it would be 'two'
    assert (out / "hook").read_text() == "pre hook\n"
    r = cli(tidal_daemon, "run", "--rich", "--service", "w=sh -c 'x", str(busybox_rootfs))
    assert r.returncode != 0 and "no closing quotation" in r.stderr and "Traceback" not in r.stderr


def test_service_that_gives_up_is_visible(
    tidal_daemon: EngineSettings, busybox_rootfs: Path
) -> None:
    r = cli(
        tidal_daemon,
        "run",
        "-d",
        "--name",
        "flaky",
        "--rich",
        "--service",
        "broken:always:2=sh -c 'echo broken starts; exit 3'",
        "--service",
        "steady=sleep 300",
        str(busybox_rootfs),
        "--",
        "sleep",
        "300",
    )
    assert r.returncode == 0, r.stderr

    def services() -> dict[str, dict[str, object]]:
        info = json.loads(cli(tidal_daemon, "inspect", "flaky").stdout)
        return {s["name"]: s for s in info["services"]}

    wait_for(lambda: services().get("broken", {}).get("state") == "gave-up")
    svc = services()
    assert svc["broken"]["restarts"] == 2 and svc["broken"]["last_exit"] == 3
    assert svc["steady"]["state"] == "running" and svc["main"]["state"] == "running"
    line = next(ln for ln in cli(tidal_daemon, "ps").stdout.splitlines() if "flaky" in ln)
    assert "running (service broken gave up after 2 restarts, last exit 3)" in line, line
    logs = cli(tidal_daemon, "logs", "flaky").stdout
    assert logs.count("broken starts") == 3 and "broken gave up after 2 restarts" in logs
    r = cli(tidal_daemon, "stop", "-t", "2", "flaky")
    assert r.returncode == 0, r.stderr
    after = services()
    assert after["steady"]["state"] == "stopped" and after["broken"]["state"] == "gave-up"


def test_ps_quiet_and_logs_tail_and_follow(
    tidal_daemon: EngineSettings, busybox_rootfs: Path
) -> None:
    bb = str(busybox_rootfs)
    r = cli(tidal_daemon, "run", "-d", "--name", "lines", bb, "--", "sh", "-c", "seq 1 50")
    assert r.returncode == 0, r.stderr
    first_id = r.stdout.strip()
    r = cli(tidal_daemon, "run", "-d", "--name", "idle", bb, "--", "sleep", "300")
    idle_id = r.stdout.strip()
    wait_for(lambda: "exited" in cli(tidal_daemon, "ps", "-a").stdout)
    assert cli(tidal_daemon, "ps", "-q").stdout == f"{idle_id[:12]}\n"
    assert cli(tidal_daemon, "ps", "-aq").stdout.split() == [first_id[:12], idle_id[:12]]
    assert cli(tidal_daemon, "logs", "--tail", "3", "lines").stdout == "48\n49\n50\n"
    assert cli(tidal_daemon, "logs", "-n", "0", "lines").stdout == ""
    assert cli(tidal_daemon, "logs", "--tail", "500", "lines").stdout.split()[0] == "1"
    r = cli(tidal_daemon, "logs", "--tail", "-2", "lines")
    assert r.returncode != 0 and "--tail -2" in r.stderr
    with EngineClient(tidal_daemon.resolved_socket_path()) as c:
        assert c.logs("lines", tail=2)[0] == b"49\n50\n"
        with pytest.raises(ConfigError, match="tail=-1 must be 0 or more"):
            c.logs("lines", tail=-1)
    # -f prints lines as they come and returns when the container exits
    r = cli(
        tidal_daemon,
        "run",
        "-d",
        "--name",
        "slow",
        bb,
        "--",
        "sh",
        "-c",
        "echo one; echo two; sleep 1.5; echo three",
    )
    assert r.returncode == 0, r.stderr
    with subprocess.Popen(
        [sys.executable, "-m", "tidal.cli.main", "logs", "-f", "--tail", "1", "slow"],
        env=daemon_env(tidal_daemon),
        stdout=subprocess.PIPE,
        text=True,
    ) as follower:
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()
            assert first in ("two\n", "three\n")
            if first == "two\n":  # started while it slept: the last line comes as written
                assert follower.poll() is None
                assert follower.stdout.readline() == "three\n"
            assert follower.wait(timeout=20) == 0
        finally:
            if follower.poll() is None:
                follower.kill()


def test_upgrade_timeout(
    tidal_daemon: EngineSettings, busybox_rootfs: Path, tmp_path: Path
) -> None:
    v2 = tmp_path / "v2"
    subprocess.run(["cp", "-a", str(busybox_rootfs), str(v2)], check=True)
    cmd = ["sh", "-c", "trap 'echo got-term; exit 0' TERM; echo up; while :; do sleep 2; done"]
    r = cli(tidal_daemon, "run", "-d", "--name", "up", str(busybox_rootfs), "--", *cmd)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "up" in cli(tidal_daemon, "logs", "up").stdout)
    # -t 0: SIGKILL right after SIGTERM, so the trap (run after the sleep) never prints
    r = cli(tidal_daemon, "upgrade", "-t", "0", "up", str(v2))
    assert r.returncode == 0 and "now on" in r.stdout, r.stderr
    assert "got-term" not in cli(tidal_daemon, "logs", "up").stdout
    wait_for(lambda: cli(tidal_daemon, "logs", "up").stdout.count("up") == 2)
    # -t 10: time for the trap to run; the old generation ends by itself with status 0
    r = cli(tidal_daemon, "upgrade", "--timeout", "10", "up", str(busybox_rootfs))
    assert r.returncode == 0, r.stderr
    assert "got-term" in cli(tidal_daemon, "logs", "up").stdout
    r = cli(tidal_daemon, "upgrade", "-t", "-1", "up", str(v2))
    assert r.returncode == 1 and "upgrade timeout -1" in r.stderr, r.stderr


def test_stdin_forwarded_with_i_as_docker(
    tidal_daemon: EngineSettings, busybox_rootfs: Path
) -> None:
    bb = str(busybox_rootfs)
    r = cli(tidal_daemon, "run", "-i", bb, "--", "sh", "-c", "cat; echo done", input="hi\nthere\n")
    assert (r.returncode, r.stdout) == (0, "hi\nthere\ndone\n"), r.stderr
    r = cli(
        tidal_daemon,
        "run",
        "-i",
        "--rm",
        bb,
        "--",
        "sh",
        "-c",
        "wc -c; exit 4",
        input="x" * 300_000,
    )
    assert (r.returncode, r.stdout.strip()) == (4, "300000"), r.stderr
    # without -i, as docker: the container's stdin is /dev/null, so cat ends at once
    r = cli(tidal_daemon, "run", bb, "--", "sh", "-c", "cat; echo no-stdin", input="hi\n")
    assert (r.returncode, r.stdout) == (0, "no-stdin\n"), r.stderr
    r = cli(tidal_daemon, "run", "-i", "-t", bb, "--", "sh", input="")
    assert r.returncode == 2 and "-i -t needs a terminal on stdin" in r.stderr, r.stderr


def test_run_i_t_relays_a_terminal(tidal_daemon: EngineSettings, busybox_rootfs: Path) -> None:
    """``tidal run -i -t IMAGE sh`` driven through a real pty: prompt, keys, window size at
    start and after a resize, the container's exit status as the CLI's."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    def set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the pty as its terminal
        argv = [sys.executable, "-m", "tidal.cli.main", "run", "-i", "-t", "--name", "tty"]
        os.execve(sys.executable, [*argv, str(busybox_rootfs), "sh"], daemon_env(tidal_daemon))
    seen = b""

    def pump(wait_s: float) -> bool:
        """Read what arrives within ``wait_s``; False once the CLI has gone (EIO)."""
        nonlocal seen
        if select.select([fd], [], [], wait_s)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            seen += data
            # busybox's line editor asks where the cursor is (after each prompt, a resize)
            # and takes keys typed before the answer as part of it: answer as a terminal does
            for _ in range(data.count(b"\x1b[6n")):
                os.write(fd, b"\x1b[1;1R")
        return True

    def read_until(pattern: bytes, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while pattern not in seen and pump(0.2):
            assert time.monotonic() < deadline, f"{pattern!r} not in {seen!r}"
        assert pattern in seen, seen

    def type_keys(keys: bytes) -> None:
        settle = time.monotonic() + 0.5  # the shell's prompt and its cursor query first
        while time.monotonic() < settle and pump(0.05):
            pass
        os.write(fd, keys)

    try:
        set_size(fd, 33, 101)
        read_until(b"# ")  # the shell's prompt (printed before the CLI attached: replayed)
        type_keys(b"stty size; tty; echo $((6*7))\r")
        read_until(b"42")
        assert b"33 101" in seen and b"/dev/pts/0" in seen
        set_size(fd, 40, 120)
        os.kill(pid, signal.SIGWINCH)
        type_keys(b"stty size\r")
        read_until(b"40 120")
        type_keys(b"exit 7\r")
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, seen
            pump(0.2)
        assert os.waitstatus_to_exitcode(status) == 7, seen
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(fd)
    ps = cli(tidal_daemon, "ps", "-a").stdout
    assert "exited (7)" in next(ln for ln in ps.splitlines() if " tty " in ln)
    assert "42" in cli(tidal_daemon, "logs", "tty").stdout  # the terminal's output is logged


def test_attach_to_a_detached_interactive_container(
    tidal_daemon: EngineSettings, busybox_rootfs: Path
) -> None:
    bb = str(busybox_rootfs)
    script = "echo before; read line; echo got $line; exit 5"
    r = cli(tidal_daemon, "run", "-d", "-i", "--name", "att", bb, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "before" in cli(tidal_daemon, "logs", "att").stdout)
    r = cli(tidal_daemon, "attach", "att", input="typed\n")
    assert (r.returncode, r.stdout) == (5, "got typed\n"), r.stderr  # output from now on
    r = cli(tidal_daemon, "run", "-d", "--name", "plain", bb, "--", "sleep", "300")
    r = cli(tidal_daemon, "attach", "plain")
    assert r.returncode == 1 and "was not started with -i or -t" in r.stderr, r.stderr
    r = cli(tidal_daemon, "attach", "att")
    assert r.returncode == 1 and "att is exited" in r.stderr, r.stderr
