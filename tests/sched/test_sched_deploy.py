"""The example manifests under deploy/ agree with what the code does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sched_fake_kube import FakeKube, api_for, deployment, node, pod

from tidal.sched.controller import ENABLED_SELECTOR, Controller, cordon_site
from tidal.sched.extender import NodeInfo
from tidal.sched.settings import SERVICE_LABEL, SchedSettings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GOLDEN = Path(__file__).parent / "golden"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_every_manifest_parses_with_kind_and_api_version() -> None:
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "scheduler-config.yaml",
        "rbac.yaml",
        "tidal-sched.yaml",
        "example-app.yaml",
    }
    for f in files:
        for d in docs(f.name):
            assert d.get("apiVersion") and d.get("kind"), f.name


def _rbac_allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
    )


def test_rbac_grants_every_call_the_controller_makes(fake_kube: FakeKube) -> None:
    fake_kube.nodes = [node("owned-1"), node("vk-a", virtual=True, site="cloud-a")]
    fake_kube.deployments = [deployment()]
    fake_kube.pods = [pod("web-1", "vk-a", "2024-11-20T10:00:00Z")]
    fake_kube.watch_events = [{"type": "MODIFIED", "object": deployment()}]
    Controller(api_for(fake_kube)).run(threading.Event(), max_cycles=1)
    cordon_site(api_for(fake_kube), "cloud-a")
    fake_kube.pods.append(pod("web-2", "", "2024-11-20T11:00:00Z"))
    api_for(fake_kube).bind_pod("shop", "web-2", "uid-web-2", "owned-1")
    role = next(d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole")
    seen = set()
    for r in fake_kube.requests:
        parts = r.path.strip("/").split("/")
        group = "apps" if parts[0] == "apis" else ""
        resource = next(p for p in ("deployments", "pods", "nodes") if p in parts)
        if parts[-1] == "binding":
            resource = "pods/binding"
        named = parts[-1] != resource
        verb = {"PATCH": "patch", "POST": "create"}.get(r.method) or (
            "watch" if r.query.get("watch") == ["true"] else ("get" if named else "list")
        )
        seen.add((group, resource, verb))
        assert _rbac_allows(role["rules"], group, resource, verb), (group, resource, verb)
    assert ("apps", "deployments", "watch") in seen and ("", "pods", "patch") in seen
    assert ("", "nodes", "patch") in seen and ("", "pods/binding", "create") in seen


def test_example_app_is_managed_and_virtual_node_is_recognised() -> None:
    app_ = next(d for d in docs("example-app.yaml") if d["kind"] == "Deployment")
    key, _, value = ENABLED_SELECTOR.partition("=")
    assert app_["metadata"]["labels"][key] == value
    assert SERVICE_LABEL in app_["spec"]["template"]["metadata"]["labels"]
    info = NodeInfo.from_k8s(docs("virtual-node.yaml")[0])
    assert info.virtual and info.site == "cloud-a"


def test_tidal_toml_loads_as_sched_settings() -> None:
    settings = load_settings(DEPLOY / "tidal.toml")
    assert settings == SchedSettings()  # the example spells out the defaults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scheduler_config_verbs_reach_the_real_extender_process(tmp_path: Path) -> None:
    cfg = docs("scheduler-config.yaml")[0]
    ext = cfg["extenders"][0]
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("web: 0\n")  # everything above 0 owned replicas goes virtual
    port = _free_port()
    env = {**os.environ, "TIDAL_CONFIG": str(DEPLOY / "tidal.toml")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tidal.cli.main",
            "sched",
            "extender",
            "--port",
            str(port),
            "--thresholds",
            str(thresholds),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("extender did not start")
        body = json.loads((GOLDEN / "filter_nodes_request.json").read_text())
        res = httpx.post(f"{base}/{ext['filterVerb']}", json=body, timeout=5).json()
        kept = [n["metadata"]["name"] for n in res["Nodes"]["items"]]
        assert kept == ["virtual-kubelet-cloud-a", "virtual-kubelet-cloud-b"]
        scores = httpx.post(f"{base}/{ext['prioritizeVerb']}", json=body, timeout=5).json()
        assert {s["Host"] for s in scores} >= {"owned-1", "virtual-kubelet-cloud-a"}
        victims = json.loads((GOLDEN / "preempt_victims_request.json").read_text())
        res = httpx.post(f"{base}/{ext['preemptVerb']}", json=victims, timeout=5).json()
        assert set(res) == {"NodeNameToMetaVictims"}
        assert set(res["NodeNameToMetaVictims"]) >= {"owned-1", "owned-2"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
