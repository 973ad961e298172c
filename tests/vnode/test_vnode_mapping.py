"""Pure mapping: a Pod (as the API server returns it) -> InstanceSpec; an instance -> PodStatus;
the Node and Lease objects."""

from __future__ import annotations

import re

import pytest

from tidal.engine.spec import PortMapping
from tidal.errors import ConfigError, PodRefusedError
from tidal.vnode import mapping
from tidal.vnode.mapping import ContainerView, NodeIdentity, PodKey

from .kube_objects import container, pod

NOW = 1_796_000_000.0  # 2026-11-30T...
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def labels(spec: object) -> dict[str, str]:
    return dict(spec.labels)  # type: ignore[attr-defined]


def test_pod_becomes_an_instance_with_its_command_env_ports_limits_and_identity() -> None:
    spec = mapping.pod_to_spec(pod(), "tidal-vn")
    assert spec.image == "busybox:1.36"
    assert spec.command == ("httpd", "-f", "-p", "8080")
    assert spec.env == (("MODE", "prod"),)
    assert spec.ports == (PortMapping(18080, 8080, "tcp", "0.0.0.0"),)
    assert spec.limits.cpus == 0.5 and spec.limits.memory_bytes == 256 * 2**20  # limits win
    assert spec.specs == () and spec.members == ()
    assert spec.restart == "always" and spec.pull == "missing"
    assert labels(spec) == {
        "io.kubernetes.pod.name": "web-7d9f-abcde",
        "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.pod.uid": "4f1c3a52-9b7e-4d0e-8a63-0d6c7e1f9a21",
        "io.kubernetes.container.main": "web",
        "tidal.io/virtual-node": "tidal-vn",
    }
    assert spec.name is not None and re.fullmatch(r"shop-web-7d9f-abcde-[0-9a-f]{8}", spec.name)
    # JSON round trip through the instance API is lossless
    assert type(spec).from_json(spec.to_json()) == spec


def test_requests_are_the_limits_when_no_limit_is_given_and_containers_add_up() -> None:
    p = pod(
        containers=[
            container(
                "a", "img-a", command=["a"], resources={"requests": {"cpu": "1", "memory": "1Gi"}}
            ),
            container("side", "img-b", command=["b"], resources={"limits": {"cpu": "250m"}}),
        ],
        restart="Never",
    )
    spec = mapping.pod_to_spec(p, "vn")
    assert spec.limits.cpus == 1.25 and spec.limits.memory_bytes == 2**30
    assert [(m.name, m.image, m.command, m.restart) for m in spec.members] == [
        ("side", "img-b", ("b",), "no")
    ]
    assert spec.restart == "no"


def test_spec_annotation_is_the_fallback_list_and_bandwidth_shapes_both_ways() -> None:
    p = pod(annotations={"tidal.io/instance-spec": "2c2g, 2c4g", "tidal.io/bandwidth": "5M"})
    spec = mapping.pod_to_spec(p, "vn")
    assert spec.specs == ("2c2g", "2c4g")
    # the types' CPUs and memory are not overridden by the container resources
    assert spec.limits.cpus is None and spec.limits.memory_bytes is None
    assert spec.limits.egress_bps == spec.limits.ingress_bps == 5_000_000


def test_a_pod_without_resources_has_no_adhoc_limits() -> None:
    p = pod(containers=[container("c", "img", command=["sleep", "1"])])
    spec = mapping.pod_to_spec(p, "vn")
    assert spec.limits == type(spec.limits)()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"env": [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "env 'DB' of container 'web' uses valueFrom.secretKeyRef",
        ),
        (
            {"env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]},
            "fieldRef 'status.podIP': the pod's and host's addresses are chosen",
        ),
        (
            {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}]},
            "fieldRef 'spec.nope' is unknown",
        ),
        (
            {"env": [{"name": "C", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]},
            "sets no limits.cpu (the kubelet would give the node's allocatable)",
        ),
        ({"envFrom": [{"configMapRef": {"name": "cm"}}]}, "uses envFrom"),
        ({"command": None, "args": ["-p", "80"]}, "gives args without command"),
        (
            {"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            "volume 'data' mounted at '/data'",
        ),
        ({"resources": {"limits": {"cpu": "lots"}}}, "limits.cpu: not a Kubernetes quantity"),
        ({"ports": [{"containerPort": 53, "hostPort": 53, "protocol": "SCTP"}]}, "SCTP"),
        ({"resources": {"limits": {"memory": "1Mi"}}}, "below 8 MiB"),
    ],
)
def test_a_pod_the_instance_api_cannot_express_is_refused_in_one_line(
    change: dict[str, object], words: str
) -> None:
    c = container("web", "img", command=["x"])
    c.update({k: v for k, v in change.items() if v is not None})
    for k, v in change.items():
        if v is None:
            c.pop(k, None)
    with pytest.raises(PodRefusedError) as info:
        mapping.pod_to_spec(pod(containers=[c]), "vn")
    msg = str(info.value)
    assert "\n" not in msg and words in msg, msg
    assert msg.startswith("pod shop/web-7d9f-abcde cannot run on this virtual node: ")
    assert isinstance(info.value, ConfigError)


def test_init_containers_host_namespaces_and_reserved_names_are_refused() -> None:
    p = pod()
    p["spec"]["hostNetwork"] = True
    with pytest.raises(PodRefusedError, match="hostNetwork, hostPID and hostIPC are not supported"):
        mapping.pod_to_spec(p, "vn")
    p = pod()
    p["spec"]["initContainers"] = [container("init", "img", command=["true"])]
    with pytest.raises(PodRefusedError, match="init containers are not supported"):
        mapping.pod_to_spec(p, "vn")
    p = pod(
        containers=[container("a", "i", command=["a"]), container("sandbox", "i", command=["b"])]
    )
    with pytest.raises(PodRefusedError, match="'main' and 'sandbox' are taken"):
        mapping.pod_to_spec(p, "vn")
    p = pod(annotations={"tidal.io/bandwidth": "fast"})
    with pytest.raises(PodRefusedError, match=re.escape("annotation tidal.io/bandwidth 'fast'")):
        mapping.pod_to_spec(p, "vn")


def test_instance_names_are_valid_and_unique_for_long_pod_names() -> None:
    a = mapping.instance_name(PodKey("a-very-long-namespace-name", "x" * 200 + ".y", "uid-1"))
    b = mapping.instance_name(PodKey("a-very-long-namespace-name", "x" * 200 + ".y", "uid-2"))
    assert a != b
    for n in (a, b):
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,40}", n), n


# --- status -------------------------------------------------------------------------------


def _instance(phase: str = "running", ip: str | None = "10.88.0.7") -> dict[str, object]:
    return {
        "id": "ab" * 16,
        "name": "shop-web-7d9f-abcde-1234abcd",
        "phase": phase,
        "status": phase,
        "ip": ip,
        "created_at": NOW - 5,
        "containers": [
            {"member": "sandbox", "id": "c0"},
            {"member": "main", "id": "c1"},
            {"member": "side", "id": "c2"},
        ],
    }


def _view(cid: str, status: str, **kw: object) -> ContainerView:
    base: dict[str, object] = {
        "id": cid,
        "status": status,
        "started_at": NOW - 4,
        "finished_at": None,
        "exit_code": None,
        "oom_killed": False,
        "starts": 1,
        "image": "/var/lib/tidal/images/web",
    }
    base.update(kw)
    return ContainerView(**base)  # type: ignore[arg-type]


def _two() -> dict[str, object]:
    return pod(
        containers=[
            container("web", "web:1", command=["w"]),
            container("side", "side:1", command=["s"]),
        ],
        restart="Never",
    )


def test_running_instance_is_a_running_ready_pod_with_ips_and_container_ids() -> None:
    views = {"c1": _view("c1", "running"), "c2": _view("c2", "running")}
    st = mapping.pod_status(_two(), _instance(), views, "192.168.1.5", NOW)
    assert st["phase"] == "Running"
    assert st["podIP"] == "10.88.0.7" and st["podIPs"] == [{"ip": "10.88.0.7"}]
    assert st["hostIP"] == "192.168.1.5" and st["hostIPs"] == [{"ip": "192.168.1.5"}]
    assert RFC3339.match(st["startTime"])
    conds = {c["type"]: c for c in st["conditions"]}
    assert set(conds) == {"PodScheduled", "Initialized", "ContainersReady", "Ready"}
    assert all(
        c["status"] == "True" and RFC3339.match(c["lastTransitionTime"]) for c in conds.values()
    )
    web, side = st["containerStatuses"]
    assert web["name"] == "web" and side["name"] == "side"  # Kubernetes names, not "main"
    assert web["containerID"] == "tidal://c1" and side["containerID"] == "tidal://c2"
    assert web["image"] == "web:1" and web["imageID"].startswith("tidal://")
    assert web["ready"] and web["started"] and web["restartCount"] == 0
    assert RFC3339.match(web["state"]["running"]["startedAt"])


def test_transition_times_stay_while_the_condition_holds() -> None:
    views = {"c1": _view("c1", "running"), "c2": _view("c2", "running")}
    p = _two()
    first = mapping.pod_status(p, _instance(), views, "h", NOW)
    p["status"] = first
    later = mapping.pod_status(p, _instance(), views, "h", NOW + 60)
    assert later["conditions"] == first["conditions"]
    assert later == first  # nothing changed: nothing to send
    views["c2"] = _view("c2", "exited", exit_code=3, finished_at=NOW + 100)
    p["status"] = later
    after = mapping.pod_status(p, _instance(), views, "h", NOW + 120)
    ready = {c["type"]: c for c in after["conditions"]}["Ready"]
    assert (
        ready["status"] == "False"
        and ready["lastTransitionTime"] != first["conditions"][3]["lastTransitionTime"]
    )
    assert {c["type"]: c for c in after["conditions"]}["PodScheduled"] == first["conditions"][0]


def test_exited_containers_report_exit_codes_reasons_and_the_phase() -> None:
    done = {
        "c1": _view("c1", "exited", exit_code=0, finished_at=NOW - 1),
        "c2": _view("c2", "exited", exit_code=0, finished_at=NOW - 1),
    }
    st = mapping.pod_status(_two(), _instance(), done, "h", NOW)
    assert st["phase"] == "Succeeded"
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert RFC3339.match(term["startedAt"]) and RFC3339.match(term["finishedAt"])
    assert term["containerID"] == "tidal://c1"
    done["c2"] = _view("c2", "exited", exit_code=137, oom_killed=True, finished_at=NOW)
    st = mapping.pod_status(_two(), _instance(), done, "h", NOW)
    assert st["phase"] == "Failed"
    assert st["containerStatuses"][1]["state"]["terminated"]["reason"] == "OOMKilled"
    assert st["containerStatuses"][1]["state"]["terminated"]["exitCode"] == 137


def test_restart_counts_come_from_engine_starts_and_the_rich_init() -> None:
    views = {
        "c1": ContainerView.from_api(
            {
                "id": "c1",
                "status": "running",
                "started_at": NOW - 9,
                "starts": 2,
                "spec": {"image": "web"},
                "services": [
                    {"name": "main", "state": "running", "restarts": 3, "last_exit": 1},
                ],
            }
        ),
        "c2": _view("c2", "running"),
    }
    st = mapping.pod_status(_two(), _instance(), views, "h", NOW)
    web = st["containerStatuses"][0]
    assert web["restartCount"] == 4
    assert web["lastState"]["terminated"]["exitCode"] == 1


def test_an_instance_being_made_is_pending_with_waiting_containers() -> None:
    st = mapping.pod_status(_two(), None, {}, "h", NOW)
    assert st["phase"] == "Pending" and "podIP" not in st
    assert all(
        c["state"] == {"waiting": {"reason": "ContainerCreating"}} for c in st["containerStatuses"]
    )
    init = {c["type"]: c["status"] for c in st["conditions"]}
    assert init == {
        "PodScheduled": "True",
        "Initialized": "False",
        "ContainersReady": "False",
        "Ready": "False",
    }


def test_failed_status_carries_the_reason_and_one_line_message() -> None:
    st = mapping.failed_status(pod(), "UnsupportedPodSpec", "pod x cannot run: y", "h", NOW)
    assert st["phase"] == "Failed" and st["reason"] == "UnsupportedPodSpec"
    assert st["message"] == "pod x cannot run: y"
    assert st["containerStatuses"][0]["state"]["waiting"]["reason"] == "UnsupportedPodSpec"


def test_qos_class_follows_the_api_server_rule() -> None:
    g = {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}
    b = {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}
    assert mapping.qos_class(g) == "Guaranteed"
    assert mapping.qos_class(b) == "Burstable"
    assert mapping.qos_class({"containers": [{}]}) == "BestEffort"


# --- node and lease -----------------------------------------------------------------------


IDENT = NodeIdentity("tidal-vn", "cloud-a", "192.168.1.5", "host1", 10250, 110)


def test_node_has_the_labels_and_taint_of_deploy_virtual_node_yaml() -> None:
    from pathlib import Path

    import yaml

    ref = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "virtual-node.yaml").read_text())
    st = mapping.node_status(
        IDENT, {"cpus": 2.0, "memory_bytes": 4 * 2**30}, 0.5, 2**30, None, {}, NOW
    )
    node = mapping.node_object(IDENT, st)
    for k in ("type", "tidal.io/node-kind"):
        assert node["metadata"]["labels"][k] == ref["metadata"]["labels"][k]
    assert node["metadata"]["labels"]["topology.kubernetes.io/region"] == "cloud-a"
    (taint,) = node["spec"]["taints"]
    (ref_taint,) = ref["spec"]["taints"]
    assert taint["key"] == ref_taint["key"] and taint["effect"] == ref_taint["effect"]
    assert st["capacity"] == {"cpu": "2000m", "memory": "4194304Ki", "pods": "110"}
    assert st["allocatable"] == {"cpu": "1500m", "memory": "3145728Ki", "pods": "110"}
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {
        "Ready": "True",
        "MemoryPressure": "False",
        "DiskPressure": "False",
        "PIDPressure": "False",
        "NetworkUnavailable": "False",
    }
    assert {"type": "InternalIP", "address": "192.168.1.5"} in st["addresses"]
    assert st["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    assert st["nodeInfo"]["operatingSystem"] == "linux" and st["nodeInfo"]["kubeletVersion"]


def test_node_without_its_instance_service_is_not_ready_with_the_reason() -> None:
    st = mapping.node_status(IDENT, None, 0, 0, "the engine daemon is not reachable", {}, NOW)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "not reachable" in ready["message"]


def test_lease_is_a_coordination_v1_lease_with_a_micro_time() -> None:
    lease = mapping.lease_object("tidal-vn", "node-uid", NOW)
    assert lease["apiVersion"] == "coordination.k8s.io/v1" and lease["kind"] == "Lease"
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"][0] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": "tidal-vn",
        "uid": "node-uid",
    }
    assert (
        lease["spec"]["holderIdentity"] == "tidal-vn"
        and lease["spec"]["leaseDurationSeconds"] == 40
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lease["spec"]["renewTime"])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("$(A)", "a"),
        ("x$(A)y$(B)z", "xaybz"),
        ("$(MISSING)", "$(MISSING)"),  # unknown: kept as written
        ("$$(A)", "$(A)"),  # escaped
        ("$$$(A)", "$a"),
        ("$$", "$"),
        ("$A", "$A"),  # only $(...) is a reference
        ("$(A", "$(A"),  # incomplete
        ("$(A$(B)", "$(A$(B)"),  # the name runs to the first ")": "A$(B", unknown, kept
        ("end$", "end$"),
        ("$()", "$()"),
    ],
)
def test_expand_follows_the_kubelets_rules(text: str, want: str) -> None:
    assert mapping.expand(text, {"A": "a", "B": "b"}) == want


def test_env_refers_to_earlier_variables_and_the_downward_api() -> None:
    c = container(
        "web",
        "img",
        command=["sh", "-c", "echo $(GREETING) $$(HOME) $(NOPE)"],
        args=["$(POD)"],
        env=[
            {"name": "NAME", "value": "world"},
            {"name": "GREETING", "value": "hello $(NAME) $(LATER)"},
            {"name": "LATER", "value": "x"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {
                "name": "APP",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
            },
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
            {
                "name": "MCPU",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}},
            },
        ],
        resources={"limits": {"memory": "100Mi", "cpu": "250m"}, "requests": {"cpu": "250m"}},
    )
    p = pod(containers=[c], node="vn-1")
    spec = mapping.pod_to_spec(p, "vn-1")
    env = dict(spec.env)
    meta = p["metadata"]
    assert env["GREETING"] == "hello world $(LATER)"  # LATER comes after: not yet defined
    assert env["POD"] == meta["name"] and env["NS"] == meta["namespace"]
    assert env["UID"] == meta["uid"] and env["NODE"] == "vn-1" and env["SA"] == "default"
    assert env["APP"] == "web"
    assert env["MEM_MI"] == "100" and env["CPU"] == "1" and env["MCPU"] == "250"  # rounded up
    assert spec.command == (
        "sh", "-c", "echo hello world $(LATER) $(HOME) $(NOPE)", meta["name"]
    )  # fmt: skip
