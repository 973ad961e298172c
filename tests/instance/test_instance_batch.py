"""The batch API (``POST /v1/instances/batch``, ``InstanceClient.run_instances``) and
``tidal instance run --replicas N``: results in request order, one failure reported for its
instance without stopping the others, bad input one line before anything is made."""

from __future__ import annotations

import subprocess
import sys
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.errors import ConfigError, NoCapacityError
from tidal.instance.client import InstanceClient
from tidal.instance.service import instance_routes
from tidal.instance.spec import InstanceSpec
from tidal.service.server import Service
from tidal.testing.daemon import daemon_env

from .conftest import assert_nothing_left
from .test_instance_api import StandIn

Client = tuple[Daemon, InstanceClient]
real = pytest.mark.parametrize(
    "_real", [pytest.param(None, marks=[pytest.mark.root, pytest.mark.runtime,
                                        pytest.mark.cgroups, pytest.mark.netns,
                                        pytest.mark.loop])], ids=["real"]
)  # fmt: skip


@pytest.fixture
def wired(tmp_path: Path) -> tuple[StandIn, InstanceClient]:
    manager = StandIn()
    service = Service("the engine daemon", instance_routes(manager))  # type: ignore[arg-type]

    def handler(req: httpx.Request) -> httpx.Response:
        resp = service.handle(req.method, req.url.raw_path.decode(), Message(), req.content)
        return httpx.Response(resp.status, content=resp.body, headers=dict(resp.headers))

    return manager, InstanceClient(tmp_path / "unused.sock", transport=httpx.MockTransport(handler))


def test_batch_answers_in_request_order_and_a_failure_stops_nothing(
    wired: tuple[StandIn, InstanceClient],
) -> None:
    manager, client = wired
    specs = [
        InstanceSpec(image="/img", name=f"w{i}", specs=("8c32g",) if i == 2 else ())
        for i in range(6)
    ]
    got = client.run_instances(specs)
    assert [g["name"] if isinstance(g, dict) else None for g in got] == [
        "w0", "w1", None, "w3", "w4", "w5"
    ]  # fmt: skip
    assert isinstance(got[2], NoCapacityError)
    assert str(got[2]).startswith("no instance spec fits the node's free capacity: 8c32g")
    assert sorted(s.name for _, s in manager.calls if s.name) == [f"w{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, 'a batch needs {"specs": [spec, ...]}'),
        ({"specs": "x"}, 'a batch needs {"specs": [spec, ...]}'),
        ({"specs": [{"image": "/a"}, 3]}, "batch spec 1 is int, not an object"),
        ({"specs": [{"image": "/a", "name": "x"}, {"image": "/b", "name": "x"}]},
         "batch names instances more than once: x"),
        ({"specs": [{"image": "/a", "name": "bad name!"}]}, "batch spec 0: "),
    ],
    ids=["no-specs", "not-a-list", "not-an-object", "duplicate-names", "bad-name"],
)  # fmt: skip
def test_bad_batch_is_one_error_and_runs_nothing(
    wired: tuple[StandIn, InstanceClient], body: dict[str, Any], says: str
) -> None:
    manager, client = wired
    with pytest.raises(ConfigError) as info:
        client._request("POST", "/instances/batch", json=body)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert manager.calls == []


@real
def test_batch_on_a_real_daemon(
    _real: None,
    instance_daemon: Client,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    specs = [
        InstanceSpec(image=img, command=("sleep", "300"), name="b0"),
        InstanceSpec(image="/nonexistent/rootfs", command=("sleep", "300"), name="b1"),
        InstanceSpec(image=img, command=("sleep", "300"), name="b2"),
    ]
    got = client.run_instances(specs)
    assert isinstance(got[0], dict) and isinstance(got[2], dict), got
    assert (got[0]["name"], got[2]["name"]) == ("b0", "b2")
    assert got[0]["status"] == got[2]["status"] == "running"
    assert got[0]["ip"] != got[2]["ip"]
    assert not isinstance(got[1], dict) and "/nonexistent/rootfs" in str(got[1])
    assert sorted(d["name"] for d in client.instances()) == ["b0", "b2"]  # b1 left nothing
    assert not any(c["name"].startswith("b1.") for c in client.describe_all())
    for g in (got[0], got[2]):
        client.remove_instance(g["id"], force=True)
    assert_nothing_left(engine_settings)


def _cli(settings: EngineSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "instance", "run", *args],
        env=daemon_env(settings), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@real
def test_cli_replicas_names_each_and_reports_a_partial_failure(
    _real: None,
    instance_daemon: Client,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    _, client = instance_daemon
    img = str(busybox_rootfs)
    done = _cli(engine_settings, "--replicas", "3", "--name", "rep", img, "--", "sleep", "300")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["rep-0", "rep-1", "rep-2"], done.stdout
    assert all(ln.split()[1].count(".") == 3 for ln in lines), done.stdout  # each its IP
    assert "3/3 done, 0 failed" in done.stderr, done.stderr
    # rep-1 exists already: that one fails, in one line naming it; the others run
    client.run_instance(InstanceSpec(image=img, command=("sleep", "300"), name="again-1"))
    done = _cli(engine_settings, "--replicas", "3", "--name", "again", img, "--", "sleep", "300")
    assert done.returncode == 1, done
    assert [ln.split()[0] for ln in done.stdout.splitlines()] == ["again-0", "again-2"]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: instance again-1: "), done.stderr
    assert "already exists" in errors[0]
    assert "3/3 done, 1 failed" in done.stderr
    names = sorted(d["name"] for d in client.instances())
    assert names == ["again-0", "again-1", "again-2", "rep-0", "rep-1", "rep-2"]
    for d in client.instances():
        client.remove_instance(d["id"], force=True)
    assert_nothing_left(engine_settings)


@real
def test_cli_replicas_bad_input_is_one_line_and_leaves_nothing(
    _real: None,
    instance_daemon: Client,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
) -> None:
    img = str(busybox_rootfs)
    done = _cli(engine_settings, "--replicas", "2", "-p", "15690:80", img, "--", "sleep", "9")
    assert done.returncode == 1, done
    assert done.stderr.startswith("error: --replicas 2 with -p would publish the same host port")
    assert done.stderr.count("\n") == 1, done.stderr
    done = _cli(engine_settings, "--replicas", "0", img, "--", "sleep", "9")
    assert done.returncode == 2 and "--replicas" in done.stderr, done
    assert_nothing_left(engine_settings)
