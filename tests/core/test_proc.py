"""tidal.proc: one translation of a tool's failure, for runs and for long-lived children."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tidal import proc
from tidal.errors import MountError, ToolError


def test_run_names_the_purpose_and_the_tools_last_words() -> None:
    with pytest.raises(MountError, match=r"^attaching x: first; second$"):
        proc.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.stderr.write('first\\nsecond\\n'); sys.exit(3)",
            ],
            what="attaching x",
            error=MountError,
        )


def test_run_translates_a_missing_binary_with_its_install_hint() -> None:
    with pytest.raises(ToolError, match=r"no-such-tool-7 is not installed \(apt-get install x\)"):
        proc.run(["no-such-tool-7"], what="trying", install_hint="apt-get install x")


def test_spawn_translates_a_missing_binary_like_run() -> None:
    with pytest.raises(MountError, match=r"^starting it: no-such-tool-7 is not installed \(pkg\)$"):
        proc.spawn(["no-such-tool-7"], what="starting it", error=MountError, install_hint="pkg")


def test_spawn_returns_the_running_child() -> None:
    child = proc.spawn(
        [sys.executable, "-c", "print('up')"], what="a child", stdout=subprocess.PIPE
    )
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and out.strip() == b"up"


def test_run_logged_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    assert proc.run_logged(["no-such-tool-7"], what="cleaning up") is False
    assert "cleaning up: no-such-tool-7 is not installed" in caplog.text


@pytest.mark.parametrize("piped", [True, False])
def test_run_enforces_its_timeout_with_and_without_pipes(piped: bool) -> None:
    streams = {} if piped else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    t0 = time.monotonic()
    with pytest.raises(ToolError, match="sleeping: sleep did not finish"):
        proc.run(["sleep", "30"], what="sleeping", timeout_s=0.3, **streams)
    assert time.monotonic() - t0 < 5


def test_run_sees_an_unpiped_child_end_at_once() -> None:
    """Popen.wait(timeout) polls at 1, 3, 7, ... 63, 113, 163 ms: a child ending at ~118 ms
    is seen at 163. The pidfd wait sees it end when it ends (slack here for a loaded node)."""
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    best = min(_timed(lambda: proc.run(["sleep", "0.115"], what="sleep", **streams))
               for _ in range(3))  # fmt: skip
    assert best < 0.150, f"a 115 ms child took {best * 1000:.1f} ms to be seen ending"


def test_run_keeps_the_exit_status_and_feeds_input() -> None:
    assert proc.run(["cat"], what="cat", input="hello").stdout == "hello"
    done = proc.run(["sh", "-c", "exit 3"], what="sh", check=False, stdout=None, stderr=None)
    assert done.returncode == 3


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0
