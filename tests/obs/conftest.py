"""Fixtures for the observability tests: the instance tests' daemon, trees and leak check
(shared, not copied), with the kubelet log layout under the test's own directory."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from tidal.engine.settings import EngineSettings
from tidal.instance.catalog import InstanceSettings

_spec = importlib.util.spec_from_file_location(
    "tidal_tests_instance_conftest", Path(__file__).parents[1] / "instance" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_instance_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_instance_conftest)
busybox_rootfs = _instance_conftest.busybox_rootfs
engine_settings = _instance_conftest.engine_settings
instance_daemon = _instance_conftest.instance_daemon
assert_nothing_left: Callable[[EngineSettings], None] = _instance_conftest.assert_nothing_left
cleanup_engine = _instance_conftest.cleanup_engine
"""The engine tests' leak-checking cleanup (containers, bridge, cgroup parent), for a test
that runs its own daemon."""


@pytest.fixture
def instance_settings(tmp_path: Path) -> InstanceSettings:
    return InstanceSettings(
        pod_log_dir=str(tmp_path / "log" / "pods"),
        container_log_dir=str(tmp_path / "log" / "containers"),
    )
