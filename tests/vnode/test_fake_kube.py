"""The fake API server's conversation, driven by the official client: the rules of the API
reference that the virtual node relies on (so a fake that drifts from them fails here)."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from tidal.errors import (
    KubeApiConflictError,
    KubeApiError,
    KubeApiGoneError,
    KubeApiNotFoundError,
)
from tidal.testing.fake_kube import FakeKube
from tidal.vnode.kube import KubernetesNodeApi

from .kube_objects import pod


def _raw(kube: FakeKube) -> client.CoreV1Api:
    return client.CoreV1Api(client.ApiClient(client.Configuration(host=kube.url)))


def test_errors_are_status_objects_by_code(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    with pytest.raises(KubeApiNotFoundError, match=r'\(404\): nodes "n1" not found'):
        node_api.get_node("n1")
    node_api.create_node({"metadata": {"name": "n1"}})
    with pytest.raises(KubeApiConflictError, match=r'\(409\): nodes "n1" already exists'):
        node_api.create_node({"metadata": {"name": "n1"}})
    core = _raw(fake_kube)
    try:
        with pytest.raises(client.ApiException) as info:
            core.read_namespaced_pod("nope", "default")
        body = __import__("json").loads(info.value.body)
        assert body == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'pods "nope" not found',
            "reason": "NotFound",
            "details": {"name": "nope", "kind": "pods"},
            "code": 404,
        }
    finally:
        core.api_client.close()


def test_status_subresource_and_the_object_each_change_only_their_part(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    created = fake_kube.create("pods", pod(node="n1"))
    assert created["status"] == {"phase": "Pending", "qosClass": "Burstable"}  # reset on create
    rv = int(created["metadata"]["resourceVersion"])
    out = node_api.patch_pod_status(
        "shop",
        "web-7d9f-abcde",
        {"status": {"phase": "Running"}, "metadata": {"labels": {"x": "y"}}},
    )
    assert out["status"]["phase"] == "Running" and "x" not in out["metadata"]["labels"]
    assert int(out["metadata"]["resourceVersion"]) > rv
    with pytest.raises(KubeApiNotFoundError):
        node_api.patch_pod_status("shop", "other", {"status": {"phase": "Running"}})
    # the node's main resource keeps its status; status goes through nodes/{name}/status
    node_api.create_node({"metadata": {"name": "n1"}, "status": {"capacity": {"cpu": "1"}}})
    n = node_api.patch_node(
        "n1", {"metadata": {"labels": {"a": "b"}}, "status": {"capacity": {"cpu": "9"}}}
    )
    assert n["status"]["capacity"] == {"cpu": "1"} and n["metadata"]["labels"] == {"a": "b"}
    n = node_api.patch_node_status("n1", {"status": {"capacity": {"cpu": "2"}}})
    assert n["status"]["capacity"] == {"cpu": "2"}


def test_lease_renewal_checks_resource_version_and_micro_time(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    lease = node_api.create_lease(
        "kube-node-lease",
        {
            "metadata": {"name": "n1"},
            "spec": {"holderIdentity": "n1", "renewTime": "2026-01-01T00:00:00.000001Z"},
        },
    )
    stale = lease["metadata"]["resourceVersion"]
    renewed = node_api.patch_lease(
        "kube-node-lease",
        "n1",
        {
            "metadata": {"resourceVersion": stale},
            "spec": {"renewTime": "2026-01-01T00:00:10.000000Z"},
        },
    )
    assert renewed["spec"]["renewTime"] == "2026-01-01T00:00:10.000000Z"
    with pytest.raises(KubeApiConflictError, match="the object has been modified"):
        node_api.patch_lease("kube-node-lease", "n1", {"metadata": {"resourceVersion": stale}})
    with pytest.raises(KubeApiError, match=r"\(400\).*2006-01-02T15:04:05.000000Z07:00"):
        node_api.patch_lease(
            "kube-node-lease", "n1", {"spec": {"renewTime": "2026-01-01T00:00:10Z"}}
        )


def test_field_selector_lists_and_watches_only_this_nodes_pods(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    fake_kube.create("pods", pod(name="a", node="n1", uid="u-a"))
    fake_kube.create("pods", pod(name="b", node="n2", uid="u-b"))
    items, rv = node_api.list_pods("spec.nodeName=n1")
    assert [p["metadata"]["name"] for p in items] == ["a"]
    assert int(rv) == fake_kube.resource_version

    def later() -> None:
        time.sleep(0.2)
        fake_kube.create("pods", pod(name="c", node="n1", uid="u-c"))
        fake_kube.create("pods", pod(name="d", node="n2", uid="u-d"))
        fake_kube.update("pods", "b", "shop", {"spec": {"nodeName": "n1"}})  # enters the selector
        fake_kube.delete("pods", "a", "shop")  # bound: only marked
        fake_kube.delete("pods", "a", "shop", grace_s=0)  # gone

    t = threading.Thread(target=later)
    t.start()
    events = [
        (e["type"], e["object"]["metadata"]["name"])
        for e in node_api.watch_pods("spec.nodeName=n1", rv, 1)
    ]
    t.join()
    assert events == [("ADDED", "c"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "a")]


def test_deleting_a_bound_pod_marks_it_and_grace_zero_with_uid_removes_it(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    fake_kube.create("pods", pod(name="a", node="n1"))
    fake_kube.delete("pods", "a", "shop")
    marked = fake_kube.get("pods", "a", "shop")
    assert marked is not None and marked["metadata"]["deletionGracePeriodSeconds"] == 30
    assert marked["metadata"]["deletionTimestamp"].endswith("Z")
    with pytest.raises(KubeApiConflictError, match="Precondition failed: UID in precondition"):
        node_api.delete_pod("shop", "a", "some-other-uid", 0)
    node_api.delete_pod("shop", "a", marked["metadata"]["uid"], 0)
    assert fake_kube.get("pods", "a", "shop") is None
    with pytest.raises(KubeApiNotFoundError):
        node_api.delete_pod("shop", "a", marked["metadata"]["uid"], 0)


def test_a_watch_from_a_compacted_version_is_410_gone(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    _, rv = node_api.list_pods("spec.nodeName=n1")
    fake_kube.create("pods", pod(name="a", node="n1"))
    fake_kube.compact()
    with pytest.raises(KubeApiGoneError, match=r"\(410\): too old resource version"):
        list(node_api.watch_pods("spec.nodeName=n1", rv, 1))


def test_unknown_field_selector_and_patch_type_are_refused(fake_kube: FakeKube) -> None:
    core = _raw(fake_kube)
    try:
        with pytest.raises(client.ApiException) as info:
            core.list_pod_for_all_namespaces(field_selector="spec.hostname=x")
        assert info.value.status == 400 and "field label not supported" in info.value.body
        fake_kube.create("pods", pod(name="a", node="n1"))
        with pytest.raises(client.ApiException) as info:
            core.patch_namespaced_pod(
                "a",
                "shop",
                [{"op": "add", "path": "/x", "value": 1}],
                _content_type="application/json-patch+json",
            )
        assert info.value.status == 415
    finally:
        core.api_client.close()


def test_a_created_pod_gets_the_api_servers_defaults(fake_kube: FakeKube) -> None:
    created = fake_kube.create(
        "pods",
        {
            "metadata": {"name": "p", "namespace": "d"},
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "image": "web",
                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    },
                    {"name": "b", "image": "web:1.2"},
                ]
            },
        },
    )
    spec = created["spec"]
    assert spec["restartPolicy"] == "Always" and spec["terminationGracePeriodSeconds"] == 30
    a, b = spec["containers"]
    assert a["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}  # from the limits
    assert a["imagePullPolicy"] == "Always" and b["imagePullPolicy"] == "IfNotPresent"
    assert created["status"] == {"phase": "Pending", "qosClass": "Burstable"}
    only = fake_kube.create(
        "pods",
        {
            "metadata": {"name": "q", "namespace": "d"},
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "image": "w",
                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    }
                ]
            },
        },
    )
    assert only["status"]["qosClass"] == "Guaranteed"


def test_a_watch_event_reaches_the_client_as_it_happens(
    fake_kube: FakeKube, node_api: KubernetesNodeApi
) -> None:
    """Chunked, as the API server streams: a client reads each event on arrival, not when
    64 KiB have gathered or the watch ends."""
    _, rv = node_api.list_pods("spec.nodeName=n1")
    got: list[float] = []

    def watch() -> None:
        for ev in node_api.watch_pods("spec.nodeName=n1", rv, 20):
            got.append(time.monotonic())
            assert ev["type"] == "ADDED"
            node_api.abort_watches()

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)
    made = time.monotonic()
    fake_kube.create("pods", pod(name="a", node="n1"))
    t.join(timeout=15)
    assert got and got[0] - made < 3.0, got
    fake_kube_req = [r for r in fake_kube.requests if r.query.get("watch") == ["true"]]
    assert fake_kube_req and fake_kube_req[0].query["timeoutSeconds"] == ["20"]
