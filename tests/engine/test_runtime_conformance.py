"""The Runtime conformance suite (tidal.testing.runtime_suite) against runc, crun, runsc and
the fake.

The fake needs no root; runc, crun and runsc need root and the busybox rootfs, and are skipped
with the reason when those are missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.engine.runtime import CrunRuntime, RuncRuntime, RunscRuntime, Runtime
from tidal.testing.engine import FakeRuntime
from tidal.testing.runtime_suite import CHECKS, RuntimeHarness

REAL = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups]
IMPLS = [
    pytest.param("fake", id="fake"),
    pytest.param("runc", id="runc", marks=REAL),
    pytest.param("crun", id="crun", marks=REAL),
    pytest.param("runsc", id="runsc", marks=REAL),
]
CLASSES: dict[str, type[Runtime]] = {
    "runc": RuncRuntime,
    "crun": CrunRuntime,
    "runsc": RunscRuntime,
}


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RuntimeHarness]:
    impl: str = request.param
    parent = f"tidal-conf-{uuid.uuid4().hex[:6]}"
    runtime: Runtime
    if impl == "fake":
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        runtime = FakeRuntime(tmp_path / "state")
    else:
        if os.geteuid() != 0:
            pytest.skip(f"{impl} needs root")
        if shutil.which(impl) is None:
            pytest.skip(f"{impl} is not installed (apt-get install {impl})")
        rootfs = request.getfixturevalue("busybox_rootfs")
        cls = CLASSES[impl]
        if impl == "crun":
            from tidal.engine.hostprep import prepare_hybrid_cgroups

            prepare_hybrid_cgroups()
        runtime = cls(tmp_path / "state")
    work = tmp_path / "work"
    work.mkdir()
    h = RuntimeHarness(runtime, rootfs, work, cgroup_parent=parent)
    try:
        yield h
    finally:
        left = h.cleanup()
        for ctrl in Path("/sys/fs/cgroup").iterdir() if impl != "fake" else ():
            with contextlib.suppress(OSError):
                (ctrl / parent).rmdir()
        assert not left, f"containers left behind: {left}"


@pytest.mark.parametrize("harness", IMPLS, indirect=True)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_runtime_conformance(
    harness: RuntimeHarness, check: Callable[[RuntimeHarness], None]
) -> None:
    check(harness)


def test_capabilities_are_declared_per_implementation() -> None:
    assert RuncRuntime.capabilities.namespaces and CrunRuntime.capabilities.namespaces
    assert CrunRuntime.capabilities.hybrid_cgroups_need_empty_v2
    assert not RuncRuntime.capabilities.hybrid_cgroups_need_empty_v2
    assert not FakeRuntime.capabilities.namespaces and not FakeRuntime.capabilities.reports_oom
    gvisor = RunscRuntime.capabilities
    assert gvisor.pod_sandbox and gvisor.own_proc_view and not gvisor.update
    assert not gvisor.create_checks_executable
    for cls in (RuncRuntime, CrunRuntime, FakeRuntime):
        assert cls.capabilities.update and not cls.capabilities.pod_sandbox
        assert not cls.capabilities.own_proc_view
