"""Real instances write the kubelet's log layout: one file per container, stdout and stderr
told apart, long lines as P partials, the /var/log/containers link; ``tidal logs`` unchanged."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.spec import InstanceSpec, MemberSpec

from .conftest import assert_nothing_left

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.netns]
CRI_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z) (stdout|stderr) ([FP]) (.*)$"
)
LONG = 20_000  # above containerd's 16 KiB line limit
SCRIPT = (
    f"echo out-1; echo err-1 >&2; head -c {LONG} /dev/zero | tr '\\0' x; echo; "
    "echo err-2 >&2; printf no-newline"
)


def _wait_exited(client: InstanceClient, name: str, timeout_s: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = client.instance(name)
        if rec["status"] == "exited":
            return rec
        time.sleep(0.1)
    raise AssertionError(f"instance {name} still {rec['status']} after {timeout_s}s")


def test_instance_containers_log_in_the_kubelet_layout(
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    instance_settings: InstanceSettings,
) -> None:
    d, client = instance_daemon
    img = str(busybox_rootfs)
    rec = client.run_instance(
        InstanceSpec(
            image=img,
            command=("sh", "-c", SCRIPT),
            name="logger",
            labels=(
                ("io.kubernetes.pod.name", "web-7d9f"),
                ("io.kubernetes.pod.namespace", "shop"),
                ("io.kubernetes.pod.uid", "0b6b9c3e-1111-2222-3333-444455556666"),
            ),
            members=(MemberSpec("side", img, ("sh", "-c", "echo side-out; sleep 300")),),
        )
    )
    _wait_exited(client, "logger")
    pods = Path(instance_settings.pod_log_dir)
    pod_dir = pods / "shop_web-7d9f_0b6b9c3e-1111-2222-3333-444455556666"
    assert sorted(os.listdir(pod_dir)) == ["main", "side"], "one directory per container"
    assert os.listdir(pod_dir / "main") == ["0.log"]
    rows = [CRI_LINE.match(ln) for ln in (pod_dir / "main" / "0.log").read_bytes().splitlines()]
    assert all(rows), "every line is <RFC3339Nano> <stream> <F|P> <text>"
    got = [(m[2], m[3], m[4]) for m in rows if m]
    out = [(tag, text) for stream, tag, text in got if stream == b"stdout"]
    err = [(tag, text) for stream, tag, text in got if stream == b"stderr"]
    assert err == [(b"F", b"err-1"), (b"F", b"err-2")], "stderr told apart from stdout"
    assert out == [
        (b"F", b"out-1"),
        (b"P", b"x" * 16384),
        (b"F", b"x" * (LONG - 16384)),
        (b"P", b"no-newline"),
    ]
    # the links, named <pod>_<namespace>_<container>-<id>.log, point at the current files
    ids = {c["member"]: c["id"] for c in rec["containers"]}
    links = Path(instance_settings.container_log_dir)
    for member in ("main", "side"):
        link = links / f"web-7d9f_shop_{member}-{ids[member]}.log"
        assert os.readlink(link) == str(pod_dir / member / "0.log")
    side = (pod_dir / "side" / "0.log").read_bytes()
    assert re.fullmatch(rb"\S+ stdout F side-out\n", side), side
    # tidal's own log is unchanged: both streams, raw, in one file
    data, _, _ = client.instance_logs("logger")
    assert data.startswith(b"out-1\n") and b"err-1\n" in data and b"err-2\n" in data
    assert data.endswith(b"no-newline") and b"x" * LONG + b"\n" in data
    # a start after the exit is the kubelet's next restart: a new file, the link follows
    d.engine.start(ids["main"])
    _wait_exited(client, "logger")
    assert sorted(os.listdir(pod_dir / "main")) == ["0.log", "1.log"]
    link = links / f"web-7d9f_shop_main-{ids['main']}.log"
    assert os.readlink(link) == str(pod_dir / "main" / "1.log")
    assert (pod_dir / "main" / "1.log").read_bytes().count(b" stderr F err-") == 2
    client.remove_instance("logger", force=True)
    assert not pod_dir.exists() and not os.listdir(links), "removed with the instance"
    assert_nothing_left(engine_settings)
