"""Shared test set-up: capability markers skip, with a reason, where the machine lacks them.

Mark a test with ``@pytest.mark.root``, ``fuse``, ``loop``, ``cgroups``, ``registry``,
``runtime`` or ``netns``; it then runs where the capability exists and is skipped with a clear
reason elsewhere. It never passes silently.

``TIDAL_REQUIRE_ALL=1`` (``make test`` sets it) turns every such skip into a failure: a test
needing a missing capability fails at set-up with the reason, and so does a test or fixture
that calls ``pytest.skip()`` at run time (those are all "tool X is not installed" skips).
Skips declared with a ``skip``/``skipif`` marker (data that is not part of the machine, such
as the shared GenAI trace) stay skips.

``TIDAL_TEST_MISSING=registry,fuse`` declares capabilities missing whatever the machine has;
it exists only so that the tests of this file (``tests/house/test_require_all.py``) can check
both modes in a subprocess.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tidal.testing.registry_server import RegistryServer

STRICT_ENV = "TIDAL_REQUIRE_ALL"
MISSING_ENV = "TIDAL_TEST_MISSING"
_MISSING_KEY = pytest.StashKey[str]()


@functools.cache
def _capabilities() -> dict[str, str | None]:
    """Capability name -> None if present, else the reason it is missing."""
    is_root = os.geteuid() == 0
    caps: dict[str, str | None] = {}
    caps["root"] = None if is_root else "needs root"
    if not Path("/dev/fuse").exists() or not shutil.which("fusermount3"):
        caps["fuse"] = "needs /dev/fuse and fusermount3 (Debian package fuse3)"
    else:
        caps["fuse"] = None if is_root else "FUSE block devices need root"
    if not Path("/dev/loop-control").exists() or not shutil.which("losetup"):
        caps["loop"] = "needs /dev/loop-control and losetup"
    else:
        caps["loop"] = None if is_root else "loop devices need root"
    cg = Path("/sys/fs/cgroup")
    if not is_root:
        caps["cgroups"] = "writing cgroups needs root"
    elif (cg / "cgroup.controllers").exists() or (cg / "cpu").is_dir():
        caps["cgroups"] = None
    else:
        caps["cgroups"] = "no cgroup v1 cpu controller or cgroup v2 hierarchy at /sys/fs/cgroup"
    caps["registry"] = (
        None
        if shutil.which("docker-registry")
        else "needs the CNCF registry (Debian package docker-registry)"
    )
    caps["runtime"] = (
        None
        if (shutil.which("runc") or shutil.which("crun")) and is_root
        else "needs runc or crun and root"
    )
    caps["netns"] = (
        None if shutil.which("ip") and is_root else "needs iproute2 and root for network namespaces"
    )
    for name in filter(None, os.environ.get(MISSING_ENV, "").split(",")):
        if name not in caps:
            raise pytest.UsageError(
                f"{MISSING_ENV}: unknown capability {name!r} (one of {sorted(caps)})"
            )
        caps[name] = f"declared missing by {MISSING_ENV}"
    return caps


def _strict() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    caps = _capabilities()
    strict = _strict()
    for item in items:
        for name, reason in caps.items():
            if reason and item.get_closest_marker(name):
                if strict:
                    item.stash[_MISSING_KEY] = f"{name}: {reason}"
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))
                break


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = item.stash.get(_MISSING_KEY, None)
    if missing is not None:
        pytest.fail(f"capability missing ({missing}) and {STRICT_ENV}=1", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under ``TIDAL_REQUIRE_ALL=1`` a run-time ``pytest.skip()`` is a failure."""
    report = yield
    if (
        _strict()
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("skip") is None
        and item.get_closest_marker("skipif") is None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped with {STRICT_ENV}=1, which makes it a failure: {reason}"
    return report


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryServer]:
    """The real CNCF registry on a loopback port, shared by the tests of one module
    (repositories keep them apart); stopped, with its storage removed, after the module."""
    server = RegistryServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True, scope="session")
def private_data_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes the node's real state: ``$TIDAL_DATA_ROOT`` (default ``/var/lib/tidal``)
    points into the session's temporary directory unless the caller set it. Subprocesses
    inherit it; tests that need their own root still set theirs."""
    if os.environ.get("TIDAL_DATA_ROOT"):
        yield
        return
    os.environ["TIDAL_DATA_ROOT"] = str(tmp_path_factory.mktemp("data-root"))
    try:
        yield
    finally:
        os.environ.pop("TIDAL_DATA_ROOT", None)
