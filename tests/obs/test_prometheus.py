"""A real Prometheus (Debian ``prometheus``) scrapes every Tidal service and a running
instance's cAdvisor series: every target up, the series there with the kubelet's labels, a
busy container's CPU seconds increasing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidal.blobs.p2p import RootServer
from tidal.blobs.peer import PeerServer
from tidal.blockdev.fdstore import FdStore
from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.ids import Digest
from tidal.instance.catalog import InstanceSettings
from tidal.instance.client import InstanceClient
from tidal.instance.service import instance_part
from tidal.instance.spec import InstanceSpec, Limits
from tidal.node.service import NodeDaemon
from tidal.qos.api import ApiServer
from tidal.qos.metrics import QosMetrics
from tidal.sched.extender import ExtenderServer, ViewStore

from .conftest import assert_nothing_left, cleanup_engine
from .fakes import FakeAgent, Layer

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.netns]
PORTS = range(15800, 15900)  # this branch's ports on the shared machine
SCRAPE_S = 1


def free_port(taken: set[int]) -> int:
    for port in PORTS:
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise AssertionError(f"no free port in {PORTS}")


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("needs Prometheus (Debian package prometheus)")
    return path


def _query(api: httpx.Client, promql: str) -> list[dict[str, Any]]:
    r = api.get("/api/v1/query", params={"query": promql})
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def _wait(what: str, check: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen within {timeout_s}s; last: {last}")


@pytest.fixture
def services(
    tmp_path: Path,
    engine_settings: EngineSettings,
    instance_settings: InstanceSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, tuple[str, str]]]:
    """Every Tidal service, each as it serves metrics in production: the two that live on a
    unix socket through their ``--metrics-listen`` port. Name -> (host:port, metrics path)."""
    taken: set[int] = set()
    settings = dataclasses.replace(engine_settings, metrics_listen=str(free_port(taken)))
    daemon = Daemon(settings, parts=[lambda e: instance_part(e, instance_settings)])
    daemon.start()
    assert daemon.metrics_server is not None
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(tmp_path / "data"))  # the node's images
    node = NodeDaemon(
        tmp_path / "node.sock",
        fdstore=tmp_path / "fds.sock",
        metrics_listen=f"127.0.0.1:{free_port(taken)}",
    )
    fd_holder = FdStore(tmp_path / "fds.sock").holder_pid()
    node.start()
    assert node.metrics_server is not None
    qos = ApiServer(FakeAgent(), "127.0.0.1", free_port(taken), QosMetrics().registry)
    qos.start()
    extender = ExtenderServer(ViewStore(), "127.0.0.1", free_port(taken)).start()
    root = RootServer("127.0.0.1", free_port(taken)).start()
    layer = Digest("sha256:" + "cd" * 32)
    peer = PeerServer({layer: Layer()}, "127.0.0.1", free_port(taken)).start()  # type: ignore[dict-item]

    def at(url: str) -> str:
        return url.removeprefix("http://")

    engine_at = at(daemon.metrics_server.url)
    targets = {
        "engine": (engine_at, "/metrics"),
        "engine-cadvisor": (engine_at, "/metrics/cadvisor"),
        "engine-resource": (engine_at, "/metrics/resource"),
        "node": (at(node.metrics_server.url), "/metrics"),
        "qos": ("{}:{}".format(*qos.address), "/metrics"),
        "extender": (at(extender.url), "/metrics"),
        "p2p-root": (at(root.url), "/metrics"),
        "p2p-peer": (at(peer.url), "/metrics"),
    }
    try:
        yield targets
    finally:
        for s in (extender, root, peer):
            s.stop()
        qos.stop()
        node.close()
        daemon.close()
        os.kill(fd_holder, signal.SIGTERM)  # the fd store holder this test's node started
        # the bridge and cgroup parent the instance's containers made (the daemon keeps both)
        cleanup_engine(Engine(settings))


def test_prometheus_scrapes_every_service_and_an_instance(
    services: dict[str, tuple[str, str]],
    prometheus_bin: str,
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    tmp_path: Path,
) -> None:
    targets = services
    client = InstanceClient(engine_settings.resolved_socket_path())
    client.run_instance(
        InstanceSpec(
            image=str(busybox_rootfs),
            command=("sh", "-c", "while :; do :; done"),
            name="prom",
            limits=Limits(cpus=0.3),
            labels=(("io.kubernetes.pod.name", "prom-pod"), ("io.kubernetes.pod.namespace", "obs")),
        )
    )
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {"job_name": job, "metrics_path": path, "static_configs": [{"targets": [where]}]}
            for job, (where, path) in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    web = f"127.0.0.1:{free_port({int(w.rsplit(':', 1)[1]) for w, _ in targets.values()})}"
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = httpx.Client(base_url=f"http://{web}", timeout=5)
    try:

        def all_up() -> dict[str, str] | None:
            try:
                active = api.get("/api/v1/targets").json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError):
                return None
            health = {t["labels"]["job"]: t["health"] for t in active}
            return (
                health if set(health) == set(targets) and set(health.values()) == {"up"} else None
            )

        _wait("every target up", all_up)
        up = _query(api, "up")
        assert {r["metric"]["job"]: r["value"][1] for r in up} == {job: "1" for job in targets}
        # each service's own figures
        for name in (
            "tidal_engine_containers",
            "tidal_qos_node_healthy",
            "tidal_sched_extender_decisions_total",
            "tidal_p2p_root_layers",
            "tidal_p2p_loops_refused_total",
        ):
            assert _query(api, name), f"{name} not scraped"
        # the instance's cAdvisor series, with the kubelet's labels
        sel = '{job="engine-cadvisor",pod="prom-pod",namespace="obs"'
        cpu = f'container_cpu_usage_seconds_total{sel},container="main"}}'
        first = _wait("main's cpu series", lambda: _query(api, cpu))
        labels = first[0]["metric"]
        assert (
            labels["name"]
            and labels["image"] == str(busybox_rootfs)
            and labels["id"].startswith("/")
        )
        for series in (
            "container_memory_working_set_bytes",
            "container_memory_usage_bytes",
            "container_spec_memory_limit_bytes",
            "container_start_time_seconds",
        ):
            got = {r["metric"].get("container", "") for r in _query(api, f"{series}{sel}}}")}
            assert got == {"", "POD", "main"}, (series, got)
        quota = _query(api, f'container_spec_cpu_quota{sel},container=""}}')
        assert [r["value"][1] for r in quota] == ["30000"]
        rx = _query(api, f"container_network_receive_bytes_total{sel}}}")
        assert {(r["metric"].get("container", ""), r["metric"]["interface"]) for r in rx} == {
            ("", "eth0"),
            ("POD", "eth0"),
        }
        pod_cpu = (
            'pod_cpu_usage_seconds_total{job="engine-resource",pod="prom-pod",namespace="obs"}'
        )
        assert _wait("the pod's resource series", lambda: _query(api, pod_cpu))
        # cpu seconds increase from one scrape to the next
        v0 = float(first[0]["value"][1])
        grown = _wait(
            "main's cpu seconds growing",
            lambda: [r for r in _query(api, cpu) if float(r["value"][1]) > v0 + 0.1],
        )
        assert grown
    finally:
        api.close()
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()
        client.remove_instance("prom", force=True)
        client.close()
    assert_nothing_left(engine_settings)
