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
from tidal.sched.predictor import ThresholdPredictor

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
    # the controller feeds what it recorded (the last whole day) to the predictor
    want = ThresholdPredictor().fit(np.asarray(hist.counts[-MINUTES_PER_DAY:])).threshold_replicas
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
