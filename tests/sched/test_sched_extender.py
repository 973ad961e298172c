"""Golden tests of the scheduler extender on a real loopback HTTP server.

Request bodies in ``golden/`` are shaped as kube-scheduler sends them: Go field names
(``Pod``, ``Nodes``, ``NodeNames``), a full v1 Pod, and either a v1 NodeList of full node
objects or, for ``nodeCacheCapable: true``, node names only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidal.errors import KubeApiError, SchedError
from tidal.sched.extender import (
    ExtenderServer,
    ExtenderView,
    NodeInfo,
    ViewStore,
    filter_nodes,
    preempt,
)

GOLDEN = Path(__file__).parent / "golden"
OWNED = ["owned-1", "owned-2"]
VK_A, VK_B, VK_C = (f"virtual-kubelet-cloud-{s}" for s in "abc")


def golden(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GOLDEN / name).read_text())
    return doc


def view(on_owned: int, **kw: Any) -> ExtenderView:
    nodes = {
        n["metadata"]["name"]: NodeInfo.from_k8s(n) for n in golden("node_cache.json")["nodes"]
    }
    return ExtenderView(
        thresholds={"web": 3},
        owned_replicas={"web": on_owned},
        nodes=nodes,
        site_order=("cloud-a", "cloud-b", "cloud-c"),
        **kw,
    )


@pytest.fixture
def server() -> Iterator[ExtenderServer]:
    srv = ExtenderServer(ViewStore(view(0)), "127.0.0.1", 0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def post(srv: ExtenderServer, verb: str, body: object) -> httpx.Response:
    return httpx.post(f"{srv.url}/{verb}", content=json.dumps(body), timeout=5)


CORDONED = {VK_C: f"tidal: virtual node {VK_C} is cordoned; uncordon it to place pods there"}


def test_filter_full_nodes_below_threshold_keeps_owned(server: ExtenderServer) -> None:
    server.store.set(view(2))
    req = golden("filter_nodes_request.json")
    res = post(server, "filter", req)
    assert res.status_code == 200 and res.headers["content-type"] == "application/json"
    body = res.json()
    assert set(body) == {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
    # full node objects come back untouched, only the kept ones
    assert body["Nodes"]["items"] == req["Nodes"]["items"][:2]
    assert body["NodeNames"] is None and body["Error"] == ""
    reason = "tidal: web has 2 of 3 replicas on owned nodes"
    assert body["FailedNodes"] == {VK_A: reason, VK_B: reason}
    assert body["FailedAndUnresolvableNodes"] == CORDONED


def test_filter_at_threshold_sends_to_virtual_nodes(server: ExtenderServer) -> None:
    server.store.set(view(3))
    body = post(server, "filter", golden("filter_nodes_request.json")).json()
    assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == [VK_A, VK_B]
    assert set(body["FailedNodes"]) == set(OWNED)
    assert "reached its owned-node threshold (3/3)" in body["FailedNodes"]["owned-1"]
    assert body["FailedAndUnresolvableNodes"] == CORDONED


def test_filter_node_names_with_node_cache(server: ExtenderServer) -> None:
    server.store.set(view(5, failed_sites=frozenset({"cloud-a"})))
    body = post(server, "filter", golden("filter_nodenames_request.json")).json()
    assert body["Nodes"] is None
    assert body["NodeNames"] == [VK_B]
    assert set(body["FailedAndUnresolvableNodes"]) == {VK_A, VK_C}
    assert "site cloud-a has failed" in body["FailedAndUnresolvableNodes"][VK_A]


def test_filter_falls_back_when_preferred_kind_has_no_candidate() -> None:
    req = golden("filter_nodes_request.json")
    req["Nodes"]["items"] = req["Nodes"]["items"][2:]  # kube-scheduler found owned nodes full
    res = filter_nodes(req, view(0))  # type: ignore[arg-type]
    assert [n["metadata"]["name"] for n in res["Nodes"]["items"]] == [VK_A, VK_B]  # type: ignore[index]


def test_unmanaged_pod_is_only_kept_off_cordoned_nodes() -> None:
    req = golden("filter_nodes_request.json")
    del req["Pod"]["metadata"]["labels"]["tidal.io/service"]
    res = filter_nodes(req, view(0))  # type: ignore[arg-type]
    assert len(res["Nodes"]["items"]) == 4 and res["FailedNodes"] == {}  # type: ignore[index]


def test_prioritize_host_priority_list(server: ExtenderServer) -> None:
    server.store.set(view(0))
    res = post(server, "prioritize", golden("filter_nodes_request.json"))
    assert res.json() == [
        {"Host": "owned-1", "Score": 10},
        {"Host": "owned-2", "Score": 10},
        {"Host": VK_A, "Score": 5},
        {"Host": VK_B, "Score": 4},
        {"Host": VK_C, "Score": 0},
    ]
    server.store.set(view(9))
    scores = {
        h["Host"]: h["Score"]
        for h in post(server, "prioritize", golden("filter_nodenames_request.json")).json()
    }
    assert scores == {"owned-1": 1, "owned-2": 1, VK_A: 10, VK_B: 9, VK_C: 0}


def test_bad_requests_get_clear_errors(server: ExtenderServer) -> None:
    res = httpx.post(f"{server.url}/filter", content=b"{not json", timeout=5)
    assert res.status_code == 400 and "not ExtenderArgs JSON" in res.json()["Error"]
    res = post(server, "filter", {"Pod": {}})
    assert res.status_code == 200 and "neither Nodes nor NodeNames" in res.json()["Error"]
    assert post(server, "bind", {}).status_code == 404
    assert httpx.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}


def meta(*uids: str, pdb: int = 0) -> dict[str, Any]:
    return {"Pods": [{"UID": u} for u in uids], "NumPDBViolations": pdb}


VICTIMS_1 = meta("0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9")
VICTIMS_2 = meta(
    "1c2d3e4f-5061-4728-93a4-b5c6d7e8f90a", "2d3e4f50-6172-4839-a4b5-c6d7e8f90a1b", pdb=1
)


@pytest.mark.parametrize(
    "request_file", ["preempt_victims_request.json", "preempt_metavictims_request.json"]
)
def test_preempt_never_on_virtual_nodes(server: ExtenderServer, request_file: str) -> None:
    """Full victims (``nodeCacheCapable: false``) or UIDs only: the answer is UIDs, victims and
    PDB violation counts unchanged, the virtual node dropped."""
    server.store.set(view(2))  # web below its threshold: owned nodes are where it belongs
    res = post(server, "preempt", golden(request_file))
    assert res.status_code == 200
    assert res.json() == {"NodeNameToMetaVictims": {"owned-1": VICTIMS_1, "owned-2": VICTIMS_2}}


def test_preempt_not_on_owned_nodes_for_a_service_at_its_threshold(
    server: ExtenderServer,
) -> None:
    server.store.set(view(3))
    body = post(server, "preempt", golden("preempt_victims_request.json")).json()
    assert body == {"NodeNameToMetaVictims": {}}  # it goes to a virtual node instead
    # no usable virtual node (a and b failed, c cordoned): the owned nodes are its only way
    server.store.set(view(3, failed_sites=frozenset({"cloud-a", "cloud-b"})))
    body = post(server, "preempt", golden("preempt_metavictims_request.json")).json()
    assert set(body["NodeNameToMetaVictims"]) == set(OWNED)
    # a pod Tidal does not manage: only the virtual node is dropped
    req = golden("preempt_victims_request.json")
    del req["Pod"]["metadata"]["labels"]["tidal.io/service"]
    server.store.set(view(3))
    assert set(preempt(req, view(3))["NodeNameToMetaVictims"]) == set(OWNED)  # type: ignore[arg-type]


def test_preempt_bad_requests() -> None:
    with pytest.raises(SchedError, match="neither NodeNameToVictims nor NodeNameToMetaVictims"):
        preempt({"Pod": {}, "NodeNameToVictims": None}, view(0))
    req = golden("preempt_victims_request.json")
    del req["NodeNameToVictims"]["owned-1"]["Pods"][0]["metadata"]["uid"]
    with pytest.raises(SchedError, match=r"victim on node owned-1 has no metadata\.uid"):
        preempt(req, view(0))  # type: ignore[arg-type]


class RecordingBinder:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, str, str, str]] = []
        self.fail = fail

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        if self.fail:
            raise KubeApiError(self.fail)
        self.calls.append((namespace, name, uid, node))


def test_bind_counts_owned_placements_at_once() -> None:
    binder = RecordingBinder()
    srv = ExtenderServer(ViewStore(view(2)), "127.0.0.1", 0, binder=binder)
    srv.start()
    try:
        req = golden("filter_nodes_request.json")
        meta = req["Pod"]["metadata"]
        body = post(srv, "filter", req).json()
        assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == OWNED  # 2 of 3
        args = {
            "PodName": meta["name"],
            "PodNamespace": meta["namespace"],
            "PodUID": meta["uid"],
            "Node": "owned-1",
        }
        assert post(srv, "bind", args).json() == {"Error": ""}
        assert binder.calls == [("shop", meta["name"], meta["uid"], "owned-1")]
        assert srv.store.get().owned_replicas == {"web": 3}
        # the very next pod already sees the threshold reached, no resync needed
        body = post(srv, "filter", req).json()
        assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == [VK_A, VK_B]
        # a pod bound to a virtual node does not count against the owned threshold
        post(srv, "bind", {**args, "Node": VK_A})
        assert srv.store.get().owned_replicas == {"web": 3}
        missing = post(srv, "bind", {"PodName": "x"}).json()
        assert "lacks PodNamespace" in missing["Error"]
        srv.binder = RecordingBinder(fail="Kubernetes API: bind failed (409): already assigned")
        assert "409" in post(srv, "bind", args).json()["Error"]
    finally:
        srv.stop()


def test_taken_port_is_a_clear_error() -> None:
    with ExtenderServer(ViewStore(view(0)), "127.0.0.1", 0) as first:
        port = first.server_address[1]
        with pytest.raises(SchedError, match=f"cannot listen on 127.0.0.1:{port}"):
            ExtenderServer(ViewStore(view(0)), "127.0.0.1", port)


def test_filter_checks_owned_capacity_and_bind_takes_it() -> None:
    """A pod requesting 2 CPU / 4 Gi: owned-1 has room for one, owned-2 for none."""
    from tidal.sched.model import Resources

    free = {"owned-1": Resources(3000, 8192), "owned-2": Resources(1500, 65536)}
    binder = RecordingBinder()
    srv = ExtenderServer(ViewStore(view(0, free=free)), "127.0.0.1", 0, binder=binder)
    srv.start()
    try:
        req = golden("filter_nodes_request.json")
        meta = req["Pod"]["metadata"]
        body = post(srv, "filter", req).json()
        assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == ["owned-1"]
        assert body["FailedNodes"]["owned-2"] == (
            "tidal: owned node owned-2 has 1.5c64g free under its utilisation ceiling; "
            "the pod requests 2c4g"
        )
        args = {"PodName": meta["name"], "PodNamespace": "shop", "PodUID": meta["uid"]}
        assert post(srv, "bind", {**args, "Node": "owned-1"}).json() == {"Error": ""}
        assert srv.store.get().free["owned-1"] == Resources(1000, 4096)
        # no owned node can hold the next one: it may go to virtual nodes (prefer strategy)
        body = post(srv, "filter", req).json()
        assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == [VK_A, VK_B]
        assert set(body["FailedNodes"]) == set(OWNED)
    finally:
        srv.stop()


def test_bad_quantity_in_the_pod_is_the_filters_error() -> None:
    from tidal.sched.model import Resources

    req = golden("filter_nodes_request.json")
    req["Pod"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "two"
    with pytest.raises(SchedError, match="not a Kubernetes quantity: 'two'"):
        filter_nodes(req, view(0, free={"owned-1": Resources(1, 1)}))
