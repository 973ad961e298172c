"""Capacity on the create path is first taken from the engine's records (one query, no
refresh per container); an instance whose main exited unnoticed is still counted there, so
a choice that finds no room is made again from refreshed statuses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.spec import InstanceSpec

from .conftest import assert_nothing_left

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.netns,
    pytest.mark.loop,
]


@pytest.fixture
def instance_settings() -> InstanceSettings:
    return InstanceSettings(capacity_cpus=1.0)


def test_an_exit_nobody_looked_at_does_not_hold_capacity(
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    daemon, client = instance_daemon
    img = str(busybox_rootfs)
    first = client.run_instance(
        InstanceSpec(image=img, command=("sleep", "1"), name="short", specs=("1c1g",))
    )
    assert first["status"] == "running"
    time.sleep(2.5)  # main has exited; nothing asked since, so its record still says running
    assert daemon.engine.store.get("short.main").status == "running"
    second = client.run_instance(
        InstanceSpec(image=img, command=("sleep", "300"), name="next", specs=("1c1g",))
    )
    assert second["status"] == "running" and second["chosen"]["name"] == "1c1g"
    for d in client.instances():
        client.remove_instance(d["id"], force=True)
    assert_nothing_left(engine_settings)
