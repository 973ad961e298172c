"""Shared test set-up: capability markers skip, with a reason, where the machine lacks them.

Mark a test with ``@pytest.mark.root``, ``fuse``, ``loop``, ``cgroups``, ``registry``,
``runtime`` or ``netns``; it then runs where the capability exists and is skipped with a clear
reason elsewhere. It never passes silently. Set ``TIDAL_REQUIRE_ALL=1`` (as ``make test`` does
on a machine that has everything installed) to turn such skips into failures.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.testing.registry_server import RegistryServer


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
    return caps


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    caps = _capabilities()
    strict = os.environ.get("TIDAL_REQUIRE_ALL") == "1"
    for item in items:
        for name, reason in caps.items():
            if reason and item.get_closest_marker(name):
                if strict:
                    item.add_marker(
                        pytest.mark.xfail(
                            reason=f"capability missing: {reason}", run=False, strict=True
                        )
                    )
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))
                break


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
