"""Instances under gVisor: the pod's containers share one sandbox kernel through the runtime's
pod annotations. Runs once the runsc driver is registered (the runsc branch); until then it
skips with that reason, which ``make test`` (``TIDAL_REQUIRE_ALL=1``) turns into a failure."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tidal.engine import runtime as runtime_mod
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.client import InstanceClient
from tidal.instance.spec import InstanceSpec, MemberSpec

from .conftest import assert_nothing_left


def _need_runsc() -> None:
    if "runsc" not in runtime_mod.RUNTIME_CLASSES:
        pytest.skip("the runsc runtime driver is not registered (it comes with the runsc branch)")
    if shutil.which("runsc") is None:
        pytest.skip("needs gVisor's runsc (Debian package runsc)")


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.netns
@pytest.mark.loop
def test_runsc_instance_runs_its_containers_in_one_gvisor_sandbox(
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    _need_runsc()
    _, client = instance_daemon
    img = str(busybox_rootfs)
    rec = client.run_instance(
        InstanceSpec(
            image=img,
            command=(
                "sh",
                "-c",
                "mkdir -p /www && echo from-main > /www/i && httpd -f -p 8080 -h /www",
            ),
            name="gv",
            members=(MemberSpec("side", img, ("sleep", "300")),),
            runtime="runsc",
        )
    )
    assert rec["runtime"] == "runsc" and rec["status"] == "running"
    for member in ("main", "side"):
        res = client.instance_exec("gv", ["dmesg"], container=member)
        assert b"gVisor" in res.stdout, (member, res)
    # localhost between them: one sandbox's network stack holds both (httpd may still be
    # starting: the instance is "running" once its processes are, not once they listen)
    deadline = time.monotonic() + 15
    while True:
        # nc, not busybox wget: under runsc's host network (the only one this runsc release
        # runs in a netns, see the README) wget's read of a local answer gets EAGAIN
        res = client.instance_exec(
            "gv",
            ["sh", "-c", 'printf "GET /i HTTP/1.0\\r\\n\\r\\n" | nc 127.0.0.1 8080'],
            container="side",
        )
        if res.stdout.endswith(b"\r\n\r\nfrom-main\n") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert res.stdout.endswith(b"\r\n\r\nfrom-main\n"), res
    rt = runtime_mod.get_runtime("runsc", engine_settings.resolved_state_dir())
    notes = rt.pod_annotations("s" * 64, is_sandbox=False)
    assert notes, "runsc puts containers into a pod by annotations"
    assert rt.capabilities.pod_sandbox
    client.remove_instance("gv", force=True)
    assert_nothing_left(engine_settings)
