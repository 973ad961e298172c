"""tidal.proc: one translation of a tool's failure, for runs and for long-lived children."""

from __future__ import annotations

import subprocess
import sys

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
