"""Watchdog: restores every journaled cgroup when the agent that spawned it dies.

The agent holds the write end of this process's stdin. When the agent exits for any reason —
including SIGKILL or an OOM kill — the pipe closes, ``read`` returns EOF, and the watchdog puts
every cgroup in the journal back to its original values, unless the agent marked the journal
``handover`` (a graceful restart that the next agent will re-adopt) or ``clean``. So no
container stays throttled by a dead agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from tidal import proc
from tidal.cgroups import CgroupFs, CgroupV1Fs, CgroupV2Fs
from tidal.errors import QosError
from tidal.qos.executor import JOURNAL_NAME, Executor

log = logging.getLogger(__name__)


def spawn_watchdog(state_dir: Path, fs: CgroupFs) -> subprocess.Popen[bytes]:
    """Start the watchdog for ``state_dir``; keep the returned object alive for as long as the agent."""
    cmd = [
        sys.executable,
        "-m",
        "tidal.qos.watchdog",
        str(state_dir),
        str(fs.root),
        str(fs.version),
    ]
    if isinstance(fs, CgroupV1Fs):
        cmd.append(",".join(fs.controllers))
    # Lives as long as the agent and must outlive it by a moment: a spawned child, not a run.
    return proc.spawn(
        cmd,
        what=f"starting the QoS watchdog for {state_dir}",
        error=QosError,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_watchdog(child: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Close the pipe (the watchdog then checks the journal state) and reap it."""
    if child.stdin:
        child.stdin.close()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def restore_from_journal(state_dir: Path, fs: CgroupFs) -> list[str]:
    """Restore every journaled cgroup unless the journal is marked handover/clean."""
    path = state_dir / JOURNAL_NAME
    if not path.exists():
        return []
    state = json.loads(path.read_text()).get("state")
    if state in ("handover", "clean"):
        return []
    executor = Executor(fs, state_dir)
    problems = executor.restore_all()
    if not executor.journal.entries:
        executor.journal.delete()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal-qos-watchdog")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("cgroup_root", type=Path)
    parser.add_argument("version", type=int)
    parser.add_argument("controllers", nargs="?", default="")
    args = parser.parse_args(argv)
    sys.stdin.buffer.read()  # blocks until the agent closes the pipe or dies
    fs: CgroupFs
    if args.version == 1:
        fs = CgroupV1Fs(
            args.cgroup_root, tuple(c for c in args.controllers.split(",") if c) or None
        )
    else:
        fs = CgroupV2Fs(args.cgroup_root)
    problems = restore_from_journal(args.state_dir, fs)
    for p in problems:
        log.error("qos watchdog: %s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
