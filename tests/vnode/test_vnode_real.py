"""End to end with the real daemon and runc: a pod bound to the virtual node in the fake API
server becomes a running instance whose HTTP server answers on the pod IP, its status reaches
Running with that IP, the node's Lease is renewed, kubectl (Go's typed client, so the JSON must
decode into the real types) describes the pod and node as a kubelet would have left them, and
``kubectl delete`` removes the instance (the instance fixture then checks that no container,
cgroup, netns or mount is left)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from instance.conftest import (  # the instance tests' daemon, trees and leak checks
    assert_nothing_left,
    busybox_rootfs,
    engine_settings,
    instance_daemon,
    instance_settings,
)
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.client import InstanceClient
from tidal.testing.fake_kube import FakeKube
from tidal.vnode.kube import KubernetesNodeApi
from tidal.vnode.mapping import NodeIdentity
from tidal.vnode.node import VirtualNode, VirtualNodeSettings

from .kube_objects import container, pod

__all__ = ["busybox_rootfs", "engine_settings", "instance_daemon", "instance_settings"]
pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.netns,
    pytest.mark.loop,
]
NODE = "tidal-e2e"


@pytest.fixture
def vnode(
    fake_kube: FakeKube,
    node_api: KubernetesNodeApi,
    instance_daemon: tuple[Daemon, InstanceClient],
) -> Iterator[VirtualNode]:
    _, client = instance_daemon
    settings = VirtualNodeSettings(
        NodeIdentity(NODE, "cloud-a", "127.0.0.1", "e2e-host", 10250, 110),
        lease_interval_s=0.5,
        status_interval_s=0.2,
        watch_timeout_s=1,
        retry_s=0.2,
    )
    vn = VirtualNode(node_api, client, settings)
    stop = threading.Event()
    t = threading.Thread(target=vn.run, args=(stop,), name="vnode-e2e")
    t.start()
    try:
        assert fake_kube.wait_for(lambda k: k.get("leases", NODE, "kube-node-lease"), 30)
        yield vn
    finally:
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()


@pytest.fixture
def kubeconfig(fake_kube: FakeKube, tmp_path: Path) -> Path:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian package kubernetes-client)")
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake_kube.url}}],
                "users": [{"name": "t", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "t"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def _kubectl(kubeconfig: Path, *args: str) -> str:
    proc = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={"PATH": os.environ["PATH"], "HOME": str(kubeconfig.parent)},
    )
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def _status(kube: FakeKube, name: str) -> dict[str, Any]:
    p = kube.get("pods", name, "shop")
    return {} if p is None else dict(p.get("status") or {})


def test_a_bound_pod_runs_as_a_runc_instance_and_goes_with_its_deletion(
    fake_kube: FakeKube,
    vnode: VirtualNode,
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    kubeconfig: Path,
) -> None:
    _, client = instance_daemon
    node = fake_kube.get("nodes", NODE)
    assert node is not None and node["metadata"]["labels"]["tidal.io/node-kind"] == "virtual"
    cap = client.capacity()
    assert node["status"]["capacity"]["cpu"] == f"{int(cap['cpus'] * 1000)}m"
    lease_before = fake_kube.get("leases", NODE, "kube-node-lease")["spec"]["renewTime"]  # type: ignore[index]

    web = container(
        "web",
        str(busybox_rootfs),
        command=["sh", "-c"],
        args=[
            "mkdir -p /www && echo hello-from-$POD_ROLE > /www/index.html && exec httpd -f -p 8080 -h /www"
        ],
        env=[{"name": "POD_ROLE", "value": "vnode"}],
        resources={"limits": {"cpu": "500m", "memory": "128Mi"}},
    )
    side = container("side", str(busybox_rootfs), command=["sleep", "300"])
    fake_kube.create("pods", pod(name="web", node=NODE, containers=[web, side]))
    assert fake_kube.wait_for(
        lambda k: _status(k, "web").get("phase") == "Running" and _status(k, "web").get("podIP"), 60
    ), _status(fake_kube, "web")
    st = _status(fake_kube, "web")
    (inst,) = client.instances()
    assert st["podIP"] == inst["ip"]
    labels = dict(inst["spec"]["labels"])
    assert (
        labels["io.kubernetes.pod.name"] == "web"
        and labels["io.kubernetes.pod.namespace"] == "shop"
    )
    assert inst["limits"]["cpus"] == 0.5 and inst["limits"]["memory_bytes"] == 128 * 2**20
    by_member = {c["member"]: c["id"] for c in inst["containers"]}
    assert [c["name"] for c in st["containerStatuses"]] == ["web", "side"]
    assert st["containerStatuses"][0]["containerID"] == f"tidal://{by_member['main']}"
    assert st["containerStatuses"][1]["containerID"] == f"tidal://{by_member['side']}"
    assert all("running" in c["state"] for c in st["containerStatuses"])
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"
    # the pod IP serves what the pod's command wrote, with its env
    body = None
    for _ in range(50):
        try:
            body = httpx.get(f"http://{st['podIP']}:8080/", timeout=2).text
            break
        except httpx.TransportError:  # httpd binds a moment after the container starts
            threading.Event().wait(0.1)
    assert body == "hello-from-vnode\n"
    assert fake_kube.wait_for(
        lambda k: k.get("leases", NODE, "kube-node-lease")["spec"]["renewTime"] != lease_before, 30
    )

    # kubectl (Go's typed client) reads the node, its lease and the pod as a kubelet wrote them
    desc = _kubectl(kubeconfig, "describe", "pod", "-n", "shop", "web")
    assert re.search(r"^Status:\s+Running$", desc, re.M), desc
    assert re.search(rf"^IP:\s+{re.escape(st['podIP'])}$", desc, re.M), desc
    assert f"Container ID:  tidal://{by_member['main']}" in desc, desc
    assert re.search(r"^\s+Ready:\s+True\s*$", desc, re.M) and "Restart Count:  0" in desc, desc
    assert re.search(r"^\s+Ready\s+True\s*$", desc, re.M), desc  # the pod's condition
    assert "QoS Class:                   Burstable" in desc, desc
    assert re.search(
        r"Normal\s+Started\s+.*instance \S+ running, IP " + re.escape(st["podIP"]), desc
    ), desc
    desc = _kubectl(kubeconfig, "describe", "node", NODE)
    assert "Taints:             virtual-kubelet.io/provider=tidal:NoSchedule" in desc, desc
    assert re.search(r"HolderIdentity:\s+tidal-e2e", desc) and "RenewTime:" in desc, desc
    assert re.search(r"shop\s+web\s+500m \(\d+%\)", desc), desc  # the pod, on the node

    # kubectl delete: the server marks it, the node removes the instance and then the pod;
    # kubectl returns once it watched the pod go
    _kubectl(kubeconfig, "delete", "pod", "-n", "shop", "web", "--timeout=60s")
    assert fake_kube.get("pods", "web", "shop") is None
    assert client.instances() == []
    assert_nothing_left(engine_settings)
