"""The VirtualNode's loops against the fake API server (official client, real HTTP) and an
in-memory instance API: registration and lease, pods to instances and back, refusals, deletion,
reconciling on start, relisting after 410 Gone."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tidal.errors import ConfigError, InstanceError, InstanceNotFoundError, NoCapacityError
from tidal.instance.spec import InstanceSpec
from tidal.testing.fake_kube import FakeKube
from tidal.vnode.kube import KubernetesNodeApi
from tidal.vnode.mapping import LABEL_NODE, LABEL_POD_UID, NodeIdentity
from tidal.vnode.node import VirtualNode, VirtualNodeSettings

from .kube_objects import container, pod

NODE = "tidal-vn"
IDENT = NodeIdentity(NODE, "cloud-a", "192.168.7.7", "host7", 10250, 110)
FAST = VirtualNodeSettings(
    IDENT, lease_interval_s=0.2, status_interval_s=0.1, watch_timeout_s=1, retry_s=0.1
)


class MemoryInstances:
    """The instance API's verbs on dicts shaped as ``GET /v1/instances`` answers."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        self.refuse: dict[str, Exception] = {}  # instance name prefix -> error to raise
        self.ips = itertools.count(2)
        self.lock = threading.Lock()
        self.removed: list[str] = []
        self.fail_removes = 0

    def run_instance(self, spec: InstanceSpec) -> dict[str, Any]:
        assert spec.name
        for prefix, exc in self.refuse.items():
            if spec.name.startswith(prefix):
                raise exc
        with self.lock:
            if spec.name in self.items:
                raise ConfigError(f"an instance named {spec.name!r} already exists")
            members = ["sandbox", "main", *(m.name for m in spec.members)]
            conts = []
            for m in members:
                cid = f"{spec.name}-{m}"
                self.containers[cid] = {
                    "id": cid,
                    "status": "running",
                    "started_at": time.time(),
                    "starts": 1,
                    "spec": {"image": spec.image},
                }
                conts.append({"member": m, "id": cid})
            inst = {
                "id": f"id-{spec.name}",
                "name": spec.name,
                "spec": spec.to_json(),
                "phase": "running",
                "status": "running",
                "ip": f"10.99.0.{next(self.ips)}",
                "created_at": time.time(),
                "limits": spec.limits.to_json(),
                "containers": conts,
            }
            self.items[spec.name] = inst
            return inst

    def instances(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(i) for i in self.items.values()]

    def remove_instance(self, ref: str, *, force: bool = False) -> None:
        if self.fail_removes:
            self.fail_removes -= 1
            raise InstanceError(f"removing instance {ref} left work undone: (injected)")
        with self.lock:
            if ref not in self.items:
                raise InstanceNotFoundError(f"no instance {ref!r}")
            for c in self.items.pop(ref)["containers"]:
                self.containers.pop(c["id"], None)
            self.removed.append(ref)

    def capacity(self) -> dict[str, Any]:
        return {
            "cpus": 4.0,
            "memory_bytes": 8 * 2**30,
            "reserved_cpus": 0,
            "reserved_memory_bytes": 0,
        }

    def describe_all(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(c) for c in self.containers.values()]


@pytest.fixture
def instances() -> MemoryInstances:
    return MemoryInstances()


@pytest.fixture
def running(
    fake_kube: FakeKube, node_api: KubernetesNodeApi, instances: MemoryInstances
) -> Iterator[VirtualNode]:
    vn = VirtualNode(node_api, instances, FAST)
    stop = threading.Event()
    t = threading.Thread(target=vn.run, args=(stop,), name="vnode-under-test")
    t.start()
    try:
        assert fake_kube.wait_for(lambda k: k.get("leases", NODE, "kube-node-lease"), 30)
        yield vn
    finally:
        stop.set()
        t.join(timeout=10)
        assert not t.is_alive()


def _pod(fake_kube: FakeKube, name: str) -> dict[str, Any] | None:
    return fake_kube.get("pods", name, "shop")


def _phase(fake_kube: FakeKube, name: str) -> str | None:
    p = _pod(fake_kube, name)
    return None if p is None else p["status"].get("phase")


def test_register_creates_the_node_and_lease_and_keeps_foreign_taints(
    fake_kube: FakeKube, node_api: KubernetesNodeApi, instances: MemoryInstances
) -> None:
    VirtualNode(node_api, instances, FAST).register()
    node = fake_kube.get("nodes", NODE)
    assert node is not None
    assert node["metadata"]["labels"]["type"] == "virtual-kubelet"
    assert node["status"]["capacity"]["cpu"] == "4000m"
    assert next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"
    lease = fake_kube.get("leases", NODE, "kube-node-lease")
    assert lease is not None and lease["spec"]["holderIdentity"] == NODE
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    # a restart finds the node: labels and our taint again, someone else's taint kept
    fake_kube.update(
        "nodes", NODE, "", {"spec": {"taints": [{"key": "example.com/x", "effect": "NoExecute"}]}}
    )
    VirtualNode(node_api, instances, FAST).register()
    taints = fake_kube.get("nodes", NODE)["spec"]["taints"]  # type: ignore[index]
    assert [t["key"] for t in taints] == ["example.com/x", "virtual-kubelet.io/provider"]


def test_pod_runs_as_an_instance_reports_running_and_goes_with_its_deletion(
    fake_kube: FakeKube, running: VirtualNode, instances: MemoryInstances
) -> None:
    fake_kube.create("pods", pod(name="web", node=NODE))
    fake_kube.create("pods", pod(name="elsewhere", node="other-node", uid="u-2"))
    assert fake_kube.wait_for(lambda k: _phase(k, "web") == "Running", 30)
    st = _pod(fake_kube, "web")["status"]  # type: ignore[index]
    assert st["podIP"].startswith("10.99.0.") and st["hostIP"] == "192.168.7.7"
    assert st["containerStatuses"][0]["containerID"].startswith("tidal://")
    (inst,) = instances.instances()
    labels = dict(inst["spec"]["labels"])
    assert labels["io.kubernetes.pod.name"] == "web" and labels[LABEL_NODE] == NODE
    assert _phase(fake_kube, "elsewhere") == "Pending"  # not ours: untouched
    # kubectl delete: the API server marks it; the node removes the instance, then the pod
    fake_kube.delete("pods", "web", "shop")
    assert fake_kube.wait_for(lambda k: _pod(k, "web") is None, 30)
    assert instances.instances() == [] and instances.removed == [inst["name"]]
    deletes = [r for r in fake_kube.requests if r.method == "DELETE"]
    assert deletes[-1].query["gracePeriodSeconds"] == ["0"]
    assert deletes[-1].body["preconditions"]["uid"] == inst["spec"]["labels"][2][1]


def test_the_lease_is_renewed_and_node_status_refreshed(
    fake_kube: FakeKube, running: VirtualNode
) -> None:
    first = fake_kube.get("leases", NODE, "kube-node-lease")["spec"]["renewTime"]  # type: ignore[index]
    assert fake_kube.wait_for(
        lambda k: k.get("leases", NODE, "kube-node-lease")["spec"]["renewTime"] != first, 5
    )
    renewals = [r for r in fake_kube.requests if r.method == "PATCH" and "/leases/" in r.path]
    assert renewals and renewals[-1].content_type == "application/merge-patch+json"
    assert renewals[-1].body["metadata"]["resourceVersion"]  # renewed only over what it read
    beats = [
        r
        for r in fake_kube.requests
        if r.method == "PATCH" and r.path.endswith(f"/nodes/{NODE}/status")
    ]
    assert fake_kube.wait_for(
        lambda k: (
            len([r for r in k.requests if r.path.endswith(f"/nodes/{NODE}/status")]) > len(beats)
        ),
        15,
    )


def test_pods_that_cannot_run_fail_with_reason_and_the_node_goes_on(
    fake_kube: FakeKube, running: VirtualNode, instances: MemoryInstances
) -> None:
    bad = container(
        "web",
        "img",
        command=["x"],
        env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    )
    fake_kube.create("pods", pod(name="bad", node=NODE, uid="u-bad", containers=[bad]))
    instances.refuse["shop-full"] = NoCapacityError(
        "no instance spec fits the node's free capacity: 2c2g needs 2 CPUs (free 0)"
    )
    fake_kube.create("pods", pod(name="full", node=NODE, uid="u-full"))
    fake_kube.create("pods", pod(name="good", node=NODE, uid="u-good"))
    assert fake_kube.wait_for(
        lambda k: (
            _phase(k, "bad") == "Failed"
            and _phase(k, "full") == "Failed"
            and _phase(k, "good") == "Running"
        ),
        30,
    )
    bad_st = _pod(fake_kube, "bad")["status"]  # type: ignore[index]
    assert bad_st["reason"] == "UnsupportedPodSpec"
    assert bad_st["message"] == (
        "pod shop/bad cannot run on this virtual node: env 'K' of container 'web' uses "
        "valueFrom.secretKeyRef; literal values, fieldRef and resourceFieldRef are supported"
    )

    def bad_events(k: FakeKube) -> list[dict[str, Any]]:
        return [e for e in k.items("events") if e["involvedObject"]["name"] == "bad"]

    assert fake_kube.wait_for(bad_events, 30)  # recorded with the status
    (ev,) = bad_events(fake_kube)
    assert ev["type"] == "Warning" and ev["reason"] == "UnsupportedPodSpec"
    assert ev["message"] == bad_st["message"] and ev["involvedObject"]["kind"] == "Pod"
    full_st = _pod(fake_kube, "full")["status"]  # type: ignore[index]
    assert full_st["reason"] == "OutOfCapacity" and "2 CPUs (free 0)" in full_st["message"]
    good_uid = _pod(fake_kube, "good")["metadata"]["uid"]  # type: ignore[index]
    assert [dict(i["spec"]["labels"])[LABEL_POD_UID] for i in instances.instances()] == [good_uid]
    # a failed pod is still deleted as a kubelet would: no instance to remove, then grace 0
    fake_kube.delete("pods", "bad", "shop")
    assert fake_kube.wait_for(lambda k: _pod(k, "bad") is None, 30)


def test_start_reconciles_stale_instances_and_pods_without_one(
    fake_kube: FakeKube, node_api: KubernetesNodeApi, instances: MemoryInstances
) -> None:
    from tidal.vnode.mapping import pod_to_spec

    kept = pod(name="kept", node=NODE, uid="u-kept")
    fake_kube.create("pods", kept)
    live = fake_kube.get("pods", "kept", "shop")
    stale = pod(name="gone", node=NODE, uid="u-gone")
    instances.run_instance(pod_to_spec(stale, NODE))  # its pod was deleted while the node was down
    foreign = pod(name="theirs", node="other", uid="u-other")
    instances.run_instance(pod_to_spec(foreign, "other"))  # another node's: not ours to remove
    instances.run_instance(pod_to_spec(live, NODE))  # type: ignore[arg-type]
    fake_kube.create("pods", pod(name="new", node=NODE, uid="u-new"))
    vn = VirtualNode(node_api, instances, FAST)
    vn.register()
    vn.sync()
    vn.close()  # waits for the creates
    uids = sorted(dict(i["spec"]["labels"])[LABEL_POD_UID] for i in instances.instances())
    kept_uid = live["metadata"]["uid"]  # type: ignore[index]
    new_uid = fake_kube.get("pods", "new", "shop")["metadata"]["uid"]  # type: ignore[index]
    assert uids == sorted(["u-other", kept_uid, new_uid])
    assert len(instances.removed) == 1 and instances.removed[0].startswith("shop-gone-")


def test_a_410_gone_watch_relists_and_reconciles(
    fake_kube: FakeKube, running: VirtualNode, instances: MemoryInstances
) -> None:
    fake_kube.create("pods", pod(name="a", node=NODE, uid="u-a"))
    assert fake_kube.wait_for(lambda k: _phase(k, "a") == "Running", 30)
    lists_before = len(
        [
            r
            for r in fake_kube.requests
            if r.method == "GET" and "watch" not in r.query and r.path == "/api/v1/pods"
        ]
    )
    with fake_kube.lock:  # changes the open watch will never see: they are compacted away
        uid = fake_kube.get("pods", "a", "shop")["metadata"]["uid"]  # type: ignore[index]
        fake_kube.delete("pods", "a", "shop", grace_s=0)
        fake_kube.create("pods", pod(name="b", node=NODE, uid="u-b"))
        fake_kube.compact()
    assert fake_kube.wait_for(lambda k: _phase(k, "b") == "Running", 30)
    assert fake_kube.wait_for(
        lambda _: (
            not any(dict(i["spec"]["labels"])[LABEL_POD_UID] == uid for i in instances.instances())
        ),
        30,
    )
    lists_after = len(
        [
            r
            for r in fake_kube.requests
            if r.method == "GET" and "watch" not in r.query and r.path == "/api/v1/pods"
        ]
    )
    assert lists_after > lists_before


def test_a_deletion_whose_instance_removal_failed_is_tried_again(
    fake_kube: FakeKube, running: VirtualNode, instances: MemoryInstances
) -> None:
    fake_kube.create("pods", pod(name="web", node=NODE))
    assert fake_kube.wait_for(lambda k: _phase(k, "web") == "Running", 30)
    instances.fail_removes = 2
    fake_kube.delete("pods", "web", "shop")
    assert fake_kube.wait_for(lambda k: _pod(k, "web") is None, 30)
    assert instances.instances() == [] and instances.fail_removes == 0


def test_a_create_that_raced_a_finished_one_is_not_a_failure(
    fake_kube: FakeKube, node_api: KubernetesNodeApi, instances: MemoryInstances
) -> None:
    from tidal.vnode.mapping import pod_to_spec

    fake_kube.create("pods", pod(name="web", node=NODE))
    live = fake_kube.get("pods", "web", "shop")
    assert live is not None
    instances.run_instance(pod_to_spec(live, NODE))  # made by a create the node did not see end
    vn = VirtualNode(node_api, instances, FAST)
    # its instance list was never read (stale): the create finds "already exists"
    vn.handle({"type": "ADDED", "object": live})
    vn.close()  # waits for the create
    vn.update_statuses()
    st = fake_kube.get("pods", "web", "shop")["status"]  # type: ignore[index]
    assert st["phase"] == "Running" and len(instances.instances()) == 1, st
