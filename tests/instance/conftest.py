"""Fixtures for real-instance tests: the engine tests' trees, settings and leak check, plus a
daemon serving the instance API and a check that no instance, pod cgroup or record is left."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.errors import TidalError
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.service import instance_part
from tidal.testing.leaks import pod_namespace_leaks

# The engine tests' fixtures (rootfs trees, settings on a private bridge/subnet/cgroup parent)
# and their leak-checking cleanup, shared rather than copied.
_spec = importlib.util.spec_from_file_location(
    "tidal_tests_engine_conftest", Path(__file__).parents[1] / "engine" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_engine_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine_conftest)
busybox_rootfs = _engine_conftest.busybox_rootfs
debian_rootfs = _engine_conftest.debian_rootfs
engine_settings = _engine_conftest.engine_settings
cleanup_engine: Callable[[Engine], None] = _engine_conftest.cleanup_engine


def pod_cgroups(settings: EngineSettings) -> list[str]:
    """Pod cgroups under the engine's cgroup parent, in any hierarchy."""
    found = []
    root = Path("/sys/fs/cgroup")
    for ctrl in (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        d = ctrl / settings.cgroup_parent
        if d.is_dir():
            found += [str(p) for p in d.iterdir() if p.is_dir() and p.name.startswith("pod-")]
    return found


def namespace_mounts(state: Path) -> list[str]:
    """Namespace bind mounts (nsfs: a pod's IPC/UTS files, ``ip netns``) below ``state``,
    and namespace files left there unmounted."""
    with open("/proc/self/mountinfo") as fh:
        found = [
            f"{ln.split()[4]} ({ln.split()[3]})"
            for ln in fh
            if ln.split()[4].startswith(str(state)) and ln.split(" - ")[1].startswith("nsfs ")
        ]
    found += [str(p) for p in (state / "containers").glob("*/ns/*")]
    return found + pod_namespace_leaks(state)


def assert_nothing_left(settings: EngineSettings) -> None:
    """No instance record, container, pod cgroup, netns, pod namespace file or mount of this
    state directory."""
    state = settings.resolved_state_dir()
    records = list((state / "instances" / "records").glob("*.json"))
    assert not records, f"instance records left: {records}"
    eng = Engine(settings)
    try:
        assert not eng.store.list(), [r.name for r in eng.store.list()]
    finally:
        eng.close()
    assert not pod_cgroups(settings), pod_cgroups(settings)
    left_ns = namespace_mounts(state)
    assert not left_ns, f"pod namespace bind mounts or files left: {left_ns}"
    with open("/proc/self/mountinfo") as fh:
        mounts = [ln.split()[4] for ln in fh if ln.split()[4].startswith(str(state))]
    assert not mounts, mounts
    brif = Path("/sys/class/net") / settings.bridge / "brif"
    ports = sorted(os.listdir(brif)) if brif.is_dir() else []
    assert not ports, f"veths (network namespaces) left on bridge {settings.bridge}: {ports}"


@pytest.fixture
def instance_settings() -> InstanceSettings:
    return InstanceSettings()


@pytest.fixture
def instance_daemon(
    engine_settings: EngineSettings, instance_settings: InstanceSettings
) -> Iterator[tuple[Daemon, InstanceClient]]:
    """The engine daemon with the instance API, on the test's private settings."""
    d = Daemon(engine_settings, parts=[partial(instance_part, settings=instance_settings)])
    d.start()
    client = InstanceClient(engine_settings.resolved_socket_path())
    try:
        yield d, client
    finally:
        errors = []
        try:
            for item in client.instances():
                try:
                    client.remove_instance(item["id"], force=True)
                except TidalError as exc:
                    errors.append(str(exc))
        finally:
            client.close()
            d.close()
        leftover = pod_cgroups(engine_settings)
        cleanup_engine(Engine(engine_settings))
        assert not errors, errors
        assert not leftover, f"pod cgroups left behind: {leftover}"
