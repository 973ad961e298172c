"""The throughput benchmark's leak check (:func:`tidal.testing.leaks.find_leaks`) finds each
kind of resource planted in its scope, says nothing once it is gone, and never looks outside
its scope."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.testing.leaks import LeakScope, find_leaks

pytestmark = [pytest.mark.root, pytest.mark.cgroups, pytest.mark.netns, pytest.mark.loop]
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def planted(tmp_path: Path, tag: str) -> Iterator[tuple[LeakScope, dict[str, str]]]:
    """A mount, a loop device, a cgroup, a netns and a runtime container, each this test's."""
    root = tmp_path / "run"
    (root / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "mnt")], check=True)
    backing = root / "disk.img"
    backing.write_bytes(b"\0" * (1 << 20))
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    parent = f"rate-leaktest-{tag}"
    hierarchy = next(p for p in sorted(CGROUP_ROOT.iterdir()) if (p / "cgroup.procs").exists())
    cg = hierarchy / parent / "pod-x"
    cg.mkdir(parents=True)
    netns = f"rate-leak-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    runtime_root = tmp_path / "runc-root"
    (runtime_root / "ctr-1").mkdir(parents=True)
    (runtime_root / "ctr-2_sandbox:ctr-2.state").write_text("{}")  # runsc keeps files
    records = tmp_path / "engine" / "instances" / "records"
    records.mkdir(parents=True)
    (records / "abc.json").write_text("{}")
    scope = LeakScope(
        root=root,
        engine_state=tmp_path / "engine",
        cgroup_parents=(parent,),
        netns=(netns, f"rate-never-made-{tag}"),
        runtime_roots=(runtime_root,),
    )
    made = {"mount": str(root / "mnt"), "loop": loop, "cgroup": str(cg), "netns": netns}
    try:
        yield scope, made
    finally:
        subprocess.run(["umount", str(root / "mnt")], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        for d in (cg, cg.parent):
            if d.exists():
                d.rmdir()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def test_each_planted_leak_is_found_and_then_gone(
    planted: tuple[LeakScope, dict[str, str]], tmp_path: Path
) -> None:
    scope, made = planted
    leaks = find_leaks(scope)
    assert f"mount {made['mount']}" in leaks, leaks
    assert any(ln.startswith(f"loop device {made['loop']} on ") for ln in leaks), leaks
    assert f"cgroup {made['cgroup']}" in leaks, leaks
    assert f"network namespace {made['netns']}" in leaks, leaks
    assert f"runtime container ctr-1 in {tmp_path / 'runc-root'}" in leaks, leaks
    assert any(ln.startswith("runtime container ctr-2_sandbox:ctr-2.state") for ln in leaks)
    assert any(ln.startswith("instance record ") for ln in leaks), leaks
    assert not any("never-made" in ln for ln in leaks), leaks
    assert len(leaks) == 7, leaks

    subprocess.run(["umount", made["mount"]], check=True)
    subprocess.run(["losetup", "-d", made["loop"]], check=True)
    Path(made["cgroup"]).rmdir()
    subprocess.run(["ip", "netns", "del", made["netns"]], check=True)
    (tmp_path / "runc-root" / "ctr-1").rmdir()
    (tmp_path / "runc-root" / "ctr-2_sandbox:ctr-2.state").unlink()
    (tmp_path / "engine" / "instances" / "records" / "abc.json").unlink()
    assert find_leaks(scope) == []


def test_outside_the_scope_is_not_looked_at(tmp_path: Path) -> None:
    """Another run's resources (here: the host's own mounts and cgroups) are not reported."""
    assert find_leaks(LeakScope(root=tmp_path / "empty", cgroup_parents=("rate-none",))) == []
