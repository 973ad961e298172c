from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.cgroups import CpuLimits
from tidal.errors import AdjustmentError, QosError
from tidal.qos.executor import Executor, Values
from tidal.qos.watchdog import restore_from_journal, spawn_watchdog, stop_watchdog
from tidal.testing.cgroups import FakeCgroupV1Fs

SPEC = Values(CpuLimits(), None)
TIGHT = Values(CpuLimits.from_cores(0.5, shares=2), 256 << 20)


def test_apply_records_before_after_and_journals_original(
    fs: FakeCgroupV1Fs, tmp_path: Path
) -> None:
    ex = Executor(fs, tmp_path / "state")
    adj = ex.apply("batch/etl", TIGHT, "slo_feedback", "p95 high")
    assert adj.ok and adj.before == SPEC and adj.after == TIGHT
    assert ex.read("batch/etl") == TIGHT
    doc = json.loads((tmp_path / "state/journal.json").read_text())
    assert Values.from_dict(doc["entries"]["batch/etl"]["original"]) == SPEC
    assert Values.from_dict(doc["entries"]["batch/etl"]["applied"]) == TIGHT
    # Going back to the original clears the entry: nothing left to restore.
    ex.apply("batch/etl", SPEC)
    assert "batch/etl" not in ex.journal.entries
    assert [a.after for a in ex.history] == [TIGHT, SPEC]


def test_failed_write_is_rolled_back(fs: FakeCgroupV1Fs, tmp_path: Path) -> None:
    ex = Executor(fs, tmp_path / "state")
    fs.break_knob("batch/etl", "cpu.shares")  # quota is written first, then shares fails
    with pytest.raises(AdjustmentError, match=r"batch/etl.*rolled back"):
        ex.apply("batch/etl", TIGHT)
    assert (fs.root / "cpu/batch/etl/cpu.cfs_quota_us").read_text() == "-1"  # rolled back
    assert ex.counts == {"applied": 0, "failed": 1, "rolled_back": 1}
    assert ex.history[-1].rolled_back and not ex.history[-1].ok


class _LyingFs(FakeCgroupV1Fs):
    """Accepts writes but reads back something else once (another agent interfering)."""

    lie = True

    def read_cpu(self, cgroup: str) -> CpuLimits:
        got = super().read_cpu(cgroup)
        if self.lie and got.quota_us is not None:
            self.lie = False
            return CpuLimits(quota_us=got.quota_us + 1, shares=got.shares)
        return got


def test_read_back_mismatch_is_rolled_back(tmp_path: Path) -> None:
    fs = _LyingFs(tmp_path / "cg")
    fs.create("g")
    ex = Executor(fs, tmp_path / "state")
    with pytest.raises(AdjustmentError, match="reads back"):
        ex.apply("g", TIGHT)
    assert fs.read_cpu("g") == CpuLimits()


def test_restore_all_and_adopt(fs: FakeCgroupV1Fs, tmp_path: Path) -> None:
    ex = Executor(fs, tmp_path / "state")
    ex.apply("batch/etl", TIGHT)
    ex.apply("shop/web", Values(CpuLimits.from_cores(1.5), None))
    # A new agent re-adopts what is still in place and drops what an operator overwrote.
    fs.write_cpu("shop/web", CpuLimits.from_cores(3.0))
    ex2 = Executor(fs, tmp_path / "state")
    adopted, dropped = ex2.adopt()
    assert adopted == ["batch/etl"] and dropped == ["shop/web"]
    assert ex2.restore_all() == []
    assert ex2.read("batch/etl") == SPEC
    assert fs.read_cpu("shop/web") == CpuLimits.from_cores(3.0)  # not ours any more


def test_corrupt_journal_is_a_clear_error(tmp_path: Path, fs: FakeCgroupV1Fs) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state/journal.json").write_text("{not json")
    with pytest.raises(QosError, match=r"journal.*unreadable"):
        Executor(fs, tmp_path / "state")


def test_restore_from_journal_respects_handover(fs: FakeCgroupV1Fs, tmp_path: Path) -> None:
    ex = Executor(fs, tmp_path / "state")
    ex.apply("batch/etl", TIGHT)
    ex.journal.save("handover")
    assert restore_from_journal(tmp_path / "state", fs) == []
    assert ex.read("batch/etl") == TIGHT
    ex.journal.save("running")
    assert restore_from_journal(tmp_path / "state", fs) == []
    assert ex.read("batch/etl") == SPEC
    assert not (tmp_path / "state/journal.json").exists()


def test_watchdog_restores_when_the_agent_dies(fs: FakeCgroupV1Fs, tmp_path: Path) -> None:
    """The agent is a child process that applies a change and is SIGKILLed."""
    state = tmp_path / "state"
    code = (
        "import sys, time; from pathlib import Path\n"
        "from tidal.testing.cgroups import FakeCgroupV1Fs\n"
        "from tidal.qos.executor import Executor, Values\n"
        "from tidal.cgroups import CpuLimits\n"
        "from tidal.qos.watchdog import spawn_watchdog\n"
        f"fs = FakeCgroupV1Fs(Path({str(fs.root)!r}))\n"
        f"ex = Executor(fs, Path({str(state)!r})); wd = spawn_watchdog(ex.journal.path.parent, fs)\n"
        "ex.apply('batch/etl', Values(CpuLimits.from_cores(0.3, shares=2), None))\n"
        "print(wd.pid, flush=True); time.sleep(60)\n"
    )
    agent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        watchdog_pid = int(agent.stdout.readline())
        assert fs.read_cpu("batch/etl").quota_cores == pytest.approx(0.3)
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout:
            agent.stdout.close()
    # The watchdog notices the closed pipe, restores and exits.
    import os
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(watchdog_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert fs.read_cpu("batch/etl") == CpuLimits()
    assert not (state / "journal.json").exists()


def test_watchdog_clean_stop(fs: FakeCgroupV1Fs, tmp_path: Path) -> None:
    ex = Executor(fs, tmp_path / "state")
    wd = spawn_watchdog(tmp_path / "state", fs)
    try:
        ex.apply("batch/etl", TIGHT)
        ex.journal.save("handover")
    finally:
        stop_watchdog(wd)
    assert wd.returncode == 0
    assert ex.read("batch/etl") == TIGHT  # handed over, not restored
