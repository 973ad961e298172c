"""Real cgroups (v1 on this machine, v2 elsewhere): create, move a process in, adjust, roll back."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.cgroups import CgroupFs, CpuLimits
from tidal.errors import AdjustmentError
from tidal.qos.executor import Executor, Values
from tidal.qos.experiment.runner import experiment_fs

pytestmark = pytest.mark.cgroups


@pytest.fixture
def real() -> Iterator[tuple[CgroupFs, str, subprocess.Popen[bytes]]]:
    fs = experiment_fs(Path("/sys/fs/cgroup"))
    cg = f"tidal-qos-test-{os.getpid()}"
    fs.create(cg)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        fs.add_process(cg, proc.pid)
        yield fs, cg, proc
    finally:
        proc.kill()
        proc.wait()
        for _ in range(50):  # the kernel drops the dead pid from cgroup.procs shortly after
            if not fs.pids(cg):
                break
            import time

            time.sleep(0.05)
        fs.remove(cg)
        assert not fs.exists(cg)


def test_adjust_verify_and_roll_back_on_a_real_cgroup(
    real: tuple[CgroupFs, str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    fs, cg, proc = real
    assert fs.pids(cg) == [proc.pid]
    ex = Executor(fs, tmp_path / "state")
    before = ex.read(cg)
    tight = Values(CpuLimits.from_cores(0.3, shares=2), before.memory_limit_bytes)
    ex.apply(cg, tight, "test", "suppress")
    assert fs.read_cpu(cg) == fs.normalize(tight.cpu)
    # A value the kernel refuses (quota below its 1 ms minimum) fails and is rolled back.
    with pytest.raises(AdjustmentError, match="rolled back"):
        ex.apply(cg, Values(CpuLimits(quota_us=10, shares=512), before.memory_limit_bytes))
    assert fs.read_cpu(cg) == fs.normalize(tight.cpu)
    assert ex.restore_all() == []
    assert ex.read(cg) == before
    stats = fs.cpu_stats(cg)
    assert stats.usage_ns >= 0
