from __future__ import annotations

from pathlib import Path

import pytest

from tidal.cgroups import (
    CpuLimits,
    detect_cgroupfs,
    host_pressure,
    parse_pressure,
    shares_to_weight,
    weight_to_shares,
)
from tidal.errors import CgroupError, CgroupNotFoundError
from tidal.testing.cgroups import FakeCgroupV1Fs, FakeCgroupV2Fs


@pytest.fixture(params=[1, 2])
def anyfs(request: pytest.FixtureRequest, tmp_path: Path) -> FakeCgroupV1Fs | FakeCgroupV2Fs:
    fs = FakeCgroupV1Fs(tmp_path) if request.param == 1 else FakeCgroupV2Fs(tmp_path)
    fs.create("a/b")
    return fs


def test_cpu_limits_round_trip_on_both_versions(anyfs: FakeCgroupV1Fs | FakeCgroupV2Fs) -> None:
    assert anyfs.read_cpu("a/b") == CpuLimits()
    want = CpuLimits(quota_us=50_000, period_us=100_000, shares=512, burst_us=10_000, idle=True)
    anyfs.write_cpu("a/b", want)
    assert anyfs.read_cpu("a/b") == anyfs.normalize(want)
    anyfs.write_cpu("a/b", CpuLimits())
    assert anyfs.read_cpu("a/b") == CpuLimits()


def test_v1_and_v2_files_hold_native_units(tmp_path: Path) -> None:
    v1, v2 = FakeCgroupV1Fs(tmp_path / "1"), FakeCgroupV2Fs(tmp_path / "2")
    for fs in (v1, v2):
        fs.create("g")
        fs.write_cpu("g", CpuLimits.from_cores(0.5, shares=2048))
    assert (tmp_path / "1/cpu/g/cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "1/cpu/g/cpu.shares").read_text() == "2048"
    assert (tmp_path / "2/g/cpu.max").read_text() == "50000 100000"
    assert (tmp_path / "2/g/cpu.weight").read_text() == "200"


def test_weight_mapping_keeps_nice0_and_minimum() -> None:
    assert shares_to_weight(1024) == 100
    assert weight_to_shares(100) == 1024
    assert weight_to_shares(shares_to_weight(2)) == 10  # v2's minimum weight 1 is 10 shares


def test_stats_and_working_set(anyfs: FakeCgroupV1Fs | FakeCgroupV2Fs) -> None:
    anyfs.set_usage("a/b", cpu_usage_ns=3_000_000_000, memory_bytes=1 << 20)
    assert anyfs.cpu_stats("a/b").usage_ns == 3_000_000_000
    mem = anyfs.memory_stats("a/b")
    assert mem.usage_bytes == 1 << 20 and mem.limit_bytes is None
    anyfs.write_memory_limit("a/b", 64 << 20)
    assert anyfs.memory_stats("a/b").limit_bytes == 64 << 20


def test_missing_cgroup_is_a_not_found_error(anyfs: FakeCgroupV1Fs | FakeCgroupV2Fs) -> None:
    with pytest.raises(CgroupNotFoundError, match="nope"):
        anyfs.read_cpu("nope")
    assert not anyfs.exists("nope")
    with pytest.raises(FileNotFoundError):
        anyfs.cpu_stats("nope")


def test_broken_knob_raises_cgroup_error_naming_the_file(
    anyfs: FakeCgroupV1Fs | FakeCgroupV2Fs,
) -> None:
    knob = "cpu.shares" if anyfs.version == 1 else "cpu.weight"
    anyfs.break_knob("a/b", knob)
    with pytest.raises(CgroupError, match=knob):
        anyfs.write_cpu("a/b", CpuLimits(shares=100))


def test_pressure_only_on_v2_and_parsed(tmp_path: Path) -> None:
    v2 = FakeCgroupV2Fs(tmp_path / "2")
    v2.create("g")
    v2.set_usage("g", pressure_avg10=12.5)
    p = v2.pressure("g")
    assert p is not None and p.cpu_some_avg10 == 12.5
    v1 = FakeCgroupV1Fs(tmp_path / "1")
    v1.create("g")
    assert v1.pressure("g") is None
    assert parse_pressure("some avg10=1.50 avg60=0 avg300=0 total=3\nfull avg10=0.00") == 1.5


def test_host_pressure_degrades_without_psi(tmp_path: Path) -> None:
    assert host_pressure(tmp_path) is None  # no /proc/pressure: None, not an error
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "cpu").write_text("some avg10=3.00 avg60=0 avg300=0 total=1\n")
    p = host_pressure(tmp_path)
    assert p is not None and p.cpu_some_avg10 == 3.0 and p.io_some_avg10 is None


def test_detect_picks_the_version(tmp_path: Path) -> None:
    assert detect_cgroupfs(FakeCgroupV2Fs(tmp_path / "2").root).version == 2
    assert detect_cgroupfs(FakeCgroupV1Fs(tmp_path / "1").root).version == 1
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        detect_cgroupfs(tmp_path / "empty")


def test_remove_refuses_nothing_on_fake_and_clears_tree(
    anyfs: FakeCgroupV1Fs | FakeCgroupV2Fs,
) -> None:
    anyfs.remove("a")
    assert not anyfs.exists("a/b") and not anyfs.exists("a")


def test_children_and_glob_expansion(tmp_path: Path) -> None:
    from tidal.cgroups import expand_cgroups

    fs = FakeCgroupV1Fs(tmp_path)
    for cg in ("tidal/c1", "tidal/c2", "tidal/c2/inner", "other/x"):
        fs.create(cg)
    assert fs.children("tidal") == ["tidal/c1", "tidal/c2"]
    assert "tidal" in fs.children("")
    assert expand_cgroups(fs, "tidal/*") == ["tidal/c1", "tidal/c2"]
    assert expand_cgroups(fs, "*/x") == ["other/x"]
    assert expand_cgroups(fs, "tidal/c?/inner") == ["tidal/c2/inner"]
    assert expand_cgroups(fs, "/named/literal/") == ["named/literal"]
    assert expand_cgroups(fs, "missing/*") == []


def test_v1_group_only_in_the_cpu_controller_is_watched(tmp_path: Path) -> None:
    fs = FakeCgroupV1Fs(tmp_path)
    (tmp_path / "cpu" / "solo").mkdir()
    fs._populate(tmp_path / "cpu" / "solo")
    assert fs.exists("solo")
    assert fs.memory_stats("solo").limit_bytes is None
    assert fs.cpu_stats("solo").usage_ns == 0
