"""Controller mode against a fake API server on loopback that speaks the real JSON."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from sched_fake_kube import FakeKube, api_for, deployment, node, pod
from typer.testing import CliRunner

from tidal.cli.main import app
from tidal.errors import ConfigError, KubeApiError, KubeApiUnavailableError
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.controller import (
    Controller,
    KubernetesApi,
    ReplicaHistory,
    cordon_site,
    parse_quantity,
    pod_requests,
)
from tidal.sched.extender import ViewStore
from tidal.sched.policy import TidalPolicy

COST = "controller.kubernetes.io/pod-deletion-cost"


@pytest.fixture
def cluster(fake_kube: FakeKube) -> FakeKube:
    fake_kube.nodes = [
        node("owned-1"),
        node("owned-2"),
        node("vk-a", virtual=True, site="cloud-a"),
        node("vk-b", virtual=True, site="cloud-b", unschedulable=True),
    ]
    fake_kube.deployments = [
        deployment(annotations={"tidal.io/owned-threshold": "2"}),
        {
            **deployment("batch"),
            "metadata": {**deployment("batch")["metadata"], "labels": {"app": "batch"}},
        },
    ]
    fake_kube.pods = [
        pod("web-o1", "owned-1", "2024-11-20T10:00:00Z"),
        pod("web-o2", "owned-2", "2024-11-20T11:00:00Z"),
        pod("web-va-old", "vk-a", "2024-11-20T19:00:00Z"),
        pod("web-va-new", "vk-a", "2024-11-20T19:30:00Z"),
        pod("web-vb", "vk-b", "2024-11-20T18:00:00Z"),
        pod("batch-1", "owned-1", "2024-11-20T10:00:00Z", app_="batch"),
    ]
    return fake_kube


def test_reconcile_annotates_pods_and_threshold(cluster: FakeKube) -> None:
    store = ViewStore()
    ctl = Controller(api_for(cluster), store=store)
    report, rv = ctl.reconcile_all()
    assert rv == "1000" and report.deployments == 1  # batch is not labelled hybrid
    assert report.thresholds == {"web": 2}
    # list calls used the real paths and selectors
    lists = [(r.path, r.query.get("labelSelector")) for r in cluster.requests if r.method == "GET"]
    assert ("/apis/apps/v1/deployments", ["tidal.io/hybrid=enabled"]) in lists
    assert ("/api/v1/namespaces/shop/pods", ["app=web"]) in lists
    patches = {r.path: r for r in cluster.patches()}
    assert all(r.content_type == "application/merge-patch+json" for r in patches.values())
    costs = {
        p["metadata"]["name"]: int(p["metadata"]["annotations"][COST])
        for p in cluster.pods
        if COST in (p["metadata"].get("annotations") or {})
    }
    # cordoned pool drains first, then virtual newest first, then owned (newest first)
    order = sorted(costs, key=costs.__getitem__)
    assert order == ["web-vb", "web-va-new", "web-va-old", "web-o2", "web-o1"]
    assert all(costs[p] < 0 for p in order[:3]) and all(costs[p] > 0 for p in order[3:])
    assert "batch-1" not in costs
    dep = next(d for d in cluster.deployments if d["metadata"]["name"] == "web")
    assert dep["metadata"]["annotations"]["tidal.io/predicted-threshold"] == "2"
    view = store.get()
    assert view.thresholds == {"web": 2} and view.owned_replicas == {"web": 2}
    assert view.nodes["vk-b"].virtual and view.nodes["vk-b"].unschedulable
    assert view.site_order == ("cloud-a", "cloud-b")
    # a second pass finds nothing to change
    before = len(cluster.patches())
    report2, _ = ctl.reconcile_all()
    assert report2.pods_patched == 0 and report2.deployments_patched == 0
    assert len(cluster.patches()) == before


def test_watch_event_reconciles_the_changed_deployment(cluster: FakeKube) -> None:
    ctl = Controller(api_for(cluster))
    changed = deployment(annotations={"tidal.io/owned-threshold": "5"})
    cluster.watch_events = [{"type": "MODIFIED", "object": changed}]
    ctl.run(threading.Event(), max_cycles=1)
    watches = [r for r in cluster.requests if r.query.get("watch") == ["true"]]
    assert watches and watches[0].query["resourceVersion"] == ["1000"]
    dep_patches = [r.body for r in cluster.patches() if "deployments" in r.path]
    assert dep_patches[-1] == {"metadata": {"annotations": {"tidal.io/predicted-threshold": "5"}}}


def test_predicted_threshold_from_recorded_history(cluster: FakeKube) -> None:
    now = [0.0]
    dep = deployment()  # no manual threshold
    cluster.deployments = [dep]
    ctl = Controller(api_for(cluster), clock=lambda: now[0])
    report, _ = ctl.reconcile_all()
    assert report.thresholds == {"web": None}  # less than a day of history
    hist = ctl.history["web"]
    # a day: 4 replicas, ramping over an hour to an evening peak of 20
    for minute in range(1, MINUTES_PER_DAY + 1):
        ramp = min(1.0, max(0.0, (minute - 17 * 60) / 60), max(0.0, (23 * 60 - minute) / 60))
        hist.record(minute, 4.0 + 16.0 * ramp)
    now[0] = (MINUTES_PER_DAY + 1) * 60.0
    report, _ = ctl.reconcile_all()
    # the controller feeds what it recorded (the last whole day) to Tidal's policy
    want = TidalPolicy().fit(np.asarray(hist.counts[-MINUTES_PER_DAY:])).threshold_replicas
    assert report.thresholds == {"web": want} and 4 <= want < 20
    annotations = cluster.deployments[0]["metadata"]["annotations"]
    assert annotations["tidal.io/predicted-threshold"] == str(want)


def test_replica_history_fills_forward() -> None:
    h = ReplicaHistory()
    h.record(10, 3)
    h.record(13, 5)
    h.record(13, 4)
    assert h.counts == [3, 3, 3, 5]
    assert h.whole_days().size == 0


def test_api_errors_are_translated(cluster: FakeKube) -> None:
    ctl = Controller(api_for(cluster))
    cluster.fail["/api/v1/nodes"] = (403, "Forbidden")
    with pytest.raises(KubeApiError, match=r"list nodes failed \(403\): Forbidden") as info:
        ctl.reconcile_all()
    assert not isinstance(info.value, KubeApiUnavailableError)
    cluster.fail["/api/v1/nodes"] = (503, "ServiceUnavailable")
    with pytest.raises(KubeApiUnavailableError, match="503"):
        ctl.reconcile_all()


def test_bad_manual_threshold_names_the_deployment(cluster: FakeKube) -> None:
    cluster.deployments = [deployment(annotations={"tidal.io/owned-threshold": "many"})]
    with pytest.raises(ConfigError, match=r"shop/web: annotation tidal\.io/owned-threshold='many'"):
        Controller(api_for(cluster)).reconcile_all()


def test_cordon_site_patches_every_virtual_node_of_the_site(cluster: FakeKube) -> None:
    assert cordon_site(api_for(cluster), "cloud-a") == ["vk-a"]
    assert cluster.patches()[-1].body == {"spec": {"unschedulable": True}}
    assert cordon_site(api_for(cluster), "cloud-b", on=False) == ["vk-b"]
    assert (
        "unschedulable"
        not in next(n for n in cluster.nodes if n["metadata"]["name"] == "vk-b")["spec"]
    )
    with pytest.raises(ConfigError, match="no virtual node in site 'mars'"):
        cordon_site(api_for(cluster), "mars")


def test_quantities() -> None:
    assert parse_quantity("500m") == 0.5 and parse_quantity("4Gi") == 4 * 2**30
    assert parse_quantity("1e3") == 1000 and parse_quantity(2) == 2
    assert pod_requests(pod("p", "n", "2024-11-20T10:00:00Z")).cpu_milli == 2000
    with pytest.raises(ConfigError, match="not a Kubernetes quantity"):
        parse_quantity("2 cores")


def test_cli_controller_once_with_kubeconfig(cluster: FakeKube, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{cluster.url}'}}}}]\n"
        "users: [{name: me, user: {token: not-a-secret}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: me}}]\n"
        "current-context: fake\n"
    )
    res = CliRunner().invoke(
        app, ["sched", "controller", "--kubeconfig", str(kubeconfig), "--once"]
    )
    assert res.exit_code == 0, res.output
    assert "1 deployment" in res.output and "web" in res.output
    assert any(r.path == "/api/v1/namespaces/shop/pods/web-o1" for r in cluster.patches())
    res = CliRunner().invoke(
        app, ["sched", "cordon", "--site", "cloud-a", "--kubeconfig", str(kubeconfig)]
    )
    assert res.exit_code == 0 and "vk-a" in res.output


def test_bind_pod_posts_a_binding(cluster: FakeKube) -> None:
    api = api_for(cluster)
    cluster.pods.append(pod("web-new", "", "2024-11-20T20:00:00Z"))
    cluster.pods[-1]["spec"].pop("nodeName")
    api.bind_pod("shop", "web-new", "uid-web-new", "vk-a")
    req = cluster.requests[-1]
    assert (req.method, req.path) == ("POST", "/api/v1/namespaces/shop/pods/web-new/binding")
    assert req.body == {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "web-new", "namespace": "shop", "uid": "uid-web-new"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "vk-a"},
    }
    assert cluster.pods[-1]["spec"]["nodeName"] == "vk-a"
    with pytest.raises(KubeApiError, match=r"409.*already assigned"):
        api.bind_pod("shop", "web-new", "uid-web-new", "owned-1")


def test_unusable_kubeconfig_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("garbage: [\n")
    with pytest.raises(KubeApiError, match=f"cannot load kubeconfig {bad}"):
        KubernetesApi.from_kubeconfig(bad)
    with pytest.raises(KubeApiError, match="pass --kubeconfig"):
        KubernetesApi.from_kubeconfig(tmp_path / "missing")


def test_replica_history_is_bounded_and_survives_a_restart(
    cluster: FakeKube, tmp_path: Path
) -> None:
    h = ReplicaHistory(max_minutes=5)
    for minute in range(100, 108):
        h.record(minute, float(minute))
    assert (h.start_minute, h.counts) == (103, [103.0, 104.0, 105.0, 106.0, 107.0])
    h.record(90, 1.0)  # the clock stepped back: nothing is rewritten
    h.record(200, 7.0)  # away longer than the bound: a new history
    assert (h.start_minute, h.counts) == (200, [7.0])

    now = [0.0]
    cluster.deployments = [deployment()]
    history_dir = tmp_path / "history"
    ctl = Controller(api_for(cluster), clock=lambda: now[0], history_dir=history_dir)
    ctl.reconcile_all()
    hist = ctl.history["web"]
    for minute in range(1, MINUTES_PER_DAY + 1):
        hist.record(minute, 4.0 + 16.0 * (17 * 60 <= minute < 21 * 60))
    now[0] = (MINUTES_PER_DAY + 1) * 60.0
    first, _ = ctl.reconcile_all()
    assert first.thresholds["web"] is not None
    assert (history_dir / "web.json").exists()

    # a new controller process (same directory) predicts at once, from the saved day
    again = Controller(api_for(cluster), clock=lambda: now[0] + 60, history_dir=history_dir)
    second, _ = again.reconcile_all()
    assert second.thresholds == first.thresholds
    assert len(again.history["web"].counts) == len(hist.counts) + 1

    # a damaged file is set aside with a warning; the service starts over, nothing crashes
    (history_dir / "web.json").write_text('{"version": 1, "start_minute": 0, "counts": [-1]}')
    third = Controller(api_for(cluster), clock=lambda: now[0], history_dir=history_dir)
    report, _ = third.reconcile_all()
    assert report.thresholds == {"web": None}
    assert (history_dir / "web.bad").exists()


# --- what a real API server answers: 404, 403, 409, repeated 410 --------------------------------


def gone_event() -> dict[str, object]:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": "too old resource version: 1000 (1500)",
            "reason": "Expired",
            "code": 410,
        },
    }


def test_patch_of_a_pod_deleted_meanwhile_is_skipped(cluster: FakeKube) -> None:
    cluster.fail["/api/v1/namespaces/shop/pods/web-o1"] = (404, "NotFound")
    cluster.fail["/api/v1/namespaces/shop/pods/web-o2"] = (409, "Conflict")
    report, _ = Controller(api_for(cluster)).reconcile_all()
    assert report.pods_patched == 3  # five pods, one gone, one changed under the patch
    patched = {r.path.rsplit("/", 1)[-1] for r in cluster.patches() if "/pods/" in r.path}
    assert {"web-o1", "web-o2", "web-vb"} <= patched


def test_watch_error_event_410_is_gone(cluster: FakeKube) -> None:
    from tidal.errors import KubeApiGoneError

    cluster.watch_events = [gone_event()]
    with pytest.raises(KubeApiGoneError, match=r"\(410\): too old resource version"):
        list(api_for(cluster).watch_deployments(None, "tidal.io/hybrid=enabled", "1000", 5))


def test_loop_survives_403_409_and_repeated_410(cluster: FakeKube) -> None:
    from tidal.errors import KubeApiForbiddenError

    store = ViewStore()
    ctl = Controller(api_for(cluster), store=store)
    ctl.backoff_initial_s = 0.01
    store.health_source = ctl.health_problem
    cluster.fail_next["/api/v1/nodes"] = [(403, "Forbidden")]
    cluster.fail_next["/api/v1/namespaces/shop/pods/web-vb"] = [(409, "Conflict")]
    changed = deployment(annotations={"tidal.io/owned-threshold": "7"})
    cluster.watch_sessions = [
        [gone_event()],
        [gone_event()],
        [gone_event()],
        [{"type": "MODIFIED", "object": changed}],
    ]
    ctl.run(threading.Event(), max_cycles=5)
    lists = [r for r in cluster.requests if r.path == "/apis/apps/v1/deployments"]
    relists = [r for r in lists if r.query.get("watch") != ["true"]]
    assert len(relists) == 5  # 403, then a relist after each 410, then the good watch
    dep_patches = [r.body for r in cluster.patches() if "deployments" in r.path]
    assert dep_patches[-1] == {"metadata": {"annotations": {"tidal.io/predicted-threshold": "7"}}}
    assert ctl.health_problem() is None and store.health_problem() is None
    # a lasting 403 is reported at once, and the loop keeps trying
    cluster.fail["/api/v1/nodes"] = (403, "Forbidden")
    ctl.run(threading.Event(), max_cycles=2)
    problem = store.health_problem()
    assert problem is not None and "cannot reconcile" in problem and "403" in problem
    assert isinstance(ctl._last_error, KubeApiForbiddenError)


def test_unreachable_api_turns_health_bad_only_when_the_view_is_stale(cluster: FakeKube) -> None:
    now = [1000.0]
    ctl = Controller(api_for(cluster), clock=lambda: now[0])
    ctl.backoff_initial_s = 0.01
    cluster.fail["/apis/apps/v1/deployments"] = (503, "ServiceUnavailable")
    ctl.run(threading.Event(), max_cycles=2)
    assert ctl.health_problem() is None  # a brief outage: the view is still fresh
    now[0] += ctl.stale_after_s + 1
    problem = ctl.health_problem()
    assert problem is not None and "has not completed a first pass" in problem and "503" in problem


def test_a_crashed_loop_fails_the_extender_health(cluster: FakeKube) -> None:
    import httpx

    from tidal.sched.extender import ExtenderServer

    class Broken:
        def list_deployments(self, namespace: object, selector: object) -> object:
            raise RuntimeError("bug in an adapter")

    store = ViewStore()
    ctl = Controller(Broken(), store=store)  # type: ignore[arg-type]
    store.health_source = ctl.health_problem
    srv = ExtenderServer(store, "127.0.0.1", 0)
    srv.start()
    try:
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        with pytest.raises(RuntimeError):
            ctl.run(threading.Event())
        res = httpx.get(f"{srv.url}/healthz", timeout=5)
        assert res.status_code == 503
        assert res.json()["problems"] == [
            "scheduler controller stopped: RuntimeError: bug in an adapter"
        ]
    finally:
        srv.stop()


def test_quantities_with_the_clients_parser() -> None:
    from tidal.sched.extender import free_capacity

    assert parse_quantity("0.5") == 0.5 and parse_quantity("1.5Gi") == 1.5 * 2**30
    assert parse_quantity("100k") == 100_000 and parse_quantity("250M") == 250e6
    gpu_pod = pod("g", "owned-1", "2024-11-20T10:00:00Z")
    gpu_pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "1"
    gpu_pod["spec"]["initContainers"] = [
        {"name": "init", "resources": {"requests": {"cpu": "3", "memory": "1Gi"}}}
    ]
    r = pod_requests(gpu_pod)
    assert (r.cpu_milli, r.memory_mib, r.gpu) == (3000, 4096, 1)
    gpu_node = node("owned-1")
    gpu_node["status"]["allocatable"]["nvidia.com/gpu"] = "4"
    done = pod("done", "owned-1", "2024-11-20T10:00:00Z")
    done["status"]["phase"] = "Succeeded"
    free = free_capacity([gpu_node, node("vk", virtual=True)], [gpu_pod, done], 0.6)
    # 32 CPUs x 0.6 = 19.2 - 3; 128 Gi x 0.6 - 4 Gi; GPUs are not ceiled: 4 - 1
    assert set(free) == {"owned-1"}
    assert (free["owned-1"].cpu_milli, free["owned-1"].memory_mib, free["owned-1"].gpu) == (
        16200,
        int(128 * 1024 * 0.6) - 4096,
        3,
    )
    with pytest.raises(ConfigError, match="not a Kubernetes quantity: '4 GB'"):
        parse_quantity("4 GB")
