"""A fake Kubernetes API server on loopback that speaks the real JSON.

It serves what the controller uses: list/watch Deployments (apps/v1, label selectors,
``watch=true`` streams of ``{"type","object"}`` lines), list Pods and Nodes, and PATCH with
``application/merge-patch+json`` or ``strategic-merge-patch+json`` (a JSON-patch content type
with an object body is refused with a 400 ``Status``, as a real API server does). Every request
is recorded so tests can assert exactly what the client sent.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]


def merge_patch(target: Obj, patch: Obj) -> Obj:
    """RFC 7386 JSON merge patch."""
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass
class FakeKube:
    deployments: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    nodes: list[Obj] = field(default_factory=list)
    watch_events: list[Obj] = field(default_factory=list)
    watch_sessions: list[list[Obj]] = field(default_factory=list)
    """Events of successive watch requests, consumed one list per request; when empty every
    watch streams ``watch_events``."""
    fail: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path prefix -> (status code, reason) to fail with."""
    fail_next: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """path prefix -> failures for the next requests to it, one consumed per request."""
    requests: list[Request] = field(default_factory=list)
    resource_version: int = 1000
    url: str = ""

    def patches(self) -> list[Request]:
        return [r for r in self.requests if r.method == "PATCH"]


def _matches(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


def _handler(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Obj) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, body: Any) -> tuple[str, dict[str, list[str]]]:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            kube.requests.append(
                Request(self.command, url.path, q, self.headers.get("Content-Type"), body)
            )
            return url.path, q

        def _failing(self, path: str) -> bool:
            for prefix, queue in kube.fail_next.items():
                if path.startswith(prefix) and queue:
                    code, reason = queue.pop(0)
                    self._send(code, status(code, reason, f"{reason} (injected by the test)"))
                    return True
            for prefix, (code, reason) in kube.fail.items():
                if path.startswith(prefix):
                    self._send(code, status(code, reason, f"{reason} (injected by the test)"))
                    return True
            return False

        def do_GET(self) -> None:
            path, q = self._record(None)
            if self._failing(path):
                return
            sel = (q.get("labelSelector") or [None])[0]
            parts = path.strip("/").split("/")
            rv = {"resourceVersion": str(kube.resource_version)}
            if path.endswith("/deployments"):
                ns = parts[4] if len(parts) > 4 and parts[3] == "namespaces" else None
                items = [
                    d
                    for d in kube.deployments
                    if _matches(d, sel) and (ns is None or d["metadata"]["namespace"] == ns)
                ]
                if (q.get("watch") or ["false"])[0] == "true":
                    # HTTP/1.0: the stream ends when the connection closes
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    events = (
                        kube.watch_sessions.pop(0) if kube.watch_sessions else kube.watch_events
                    )
                    for ev in events:
                        self.wfile.write(json.dumps(ev).encode() + b"\n")
                        self.wfile.flush()
                    return
                self._send(
                    200,
                    {
                        "kind": "DeploymentList",
                        "apiVersion": "apps/v1",
                        "metadata": rv,
                        "items": items,
                    },
                )
            elif path == "/api/v1/pods":
                items = [
                    p
                    for p in kube.pods
                    if (p.get("spec") or {}).get("nodeName")
                    and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                ]
                self._send(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": rv, "items": items}
                )
            elif path.endswith("/pods"):
                ns = parts[3]
                items = [
                    p for p in kube.pods if p["metadata"]["namespace"] == ns and _matches(p, sel)
                ]
                self._send(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": rv, "items": items}
                )
            elif path == "/api/v1/nodes":
                self._send(
                    200,
                    {"kind": "NodeList", "apiVersion": "v1", "metadata": rv, "items": kube.nodes},
                )
            else:
                self._send(404, status(404, "NotFound", f"the server could not find {path}"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            path, _ = self._record(body)
            if self._failing(path):
                return
            parts = path.strip("/").split("/")
            if len(parts) == 7 and parts[4] == "pods" and parts[6] == "binding":
                ns, name = parts[3], parts[5]
                if body.get("kind") != "Binding" or body["metadata"].get("name") != name:
                    self._send(400, status(400, "BadRequest", "body is not this pod's Binding"))
                    return
                for p in kube.pods:
                    if p["metadata"]["namespace"] == ns and p["metadata"]["name"] == name:
                        if p["spec"].get("nodeName"):
                            self._send(
                                409,
                                status(
                                    409,
                                    "Conflict",
                                    f"pod {name} is already assigned to node "
                                    f'"{p["spec"]["nodeName"]}"',
                                ),
                            )
                            return
                        p["spec"]["nodeName"] = body["target"]["name"]
                        self._send(
                            201,
                            {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "metadata": {},
                                "status": "Success",
                                "code": 201,
                            },
                        )
                        return
                self._send(404, status(404, "NotFound", f'pods "{name}" not found'))
                return
            self._send(404, status(404, "NotFound", f"the server could not find {path}"))

        def do_PATCH(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            path, _ = self._record(body)
            if self._failing(path):
                return
            ctype = self.headers.get("Content-Type", "")
            if ctype not in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                self._send(
                    400,
                    status(400, "BadRequest", f"unsupported or mismatched patch type {ctype!r}"),
                )
                return
            parts = path.strip("/").split("/")
            name = parts[-1]
            if "pods" in parts:
                pool = [p for p in kube.pods if p["metadata"]["namespace"] == parts[3]]
            elif "deployments" in parts:
                pool = [d for d in kube.deployments if d["metadata"]["namespace"] == parts[4]]
            else:
                pool = kube.nodes
            for i, obj in enumerate(pool):
                if obj["metadata"]["name"] == name:
                    new = merge_patch(obj, body)
                    kube.resource_version += 1
                    new["metadata"]["resourceVersion"] = str(kube.resource_version)
                    for coll in (kube.pods, kube.deployments, kube.nodes):
                        for j, o in enumerate(coll):
                            if o is obj:
                                coll[j] = new
                    self._send(200, new)
                    return
                del i
            self._send(404, status(404, "NotFound", f"{name} not found"))

    return Handler


def serve(kube: FakeKube) -> ThreadingHTTPServer:
    """Start the fake on a free loopback port (the caller shuts it down)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(kube))
    srv.daemon_threads = True
    kube.url = f"http://127.0.0.1:{srv.server_address[1]}"
    return srv


# --- API objects as a real cluster returns them ---------------------------------------------


def deployment(
    name: str = "web", replicas: int = 4, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": f"uid-{name}",
            "resourceVersion": "900",
            "generation": 3,
            "creationTimestamp": "2024-11-01T10:00:00Z",
            "labels": {"app": name, "tidal.io/hybrid": "enabled", "tidal.io/service": name},
            "annotations": {"deployment.kubernetes.io/revision": "3", **(annotations or {})},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "tidal.io/service": name}},
                "spec": {
                    "containers": [
                        {
                            "name": name,
                            "image": "web:1",
                            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
                        }
                    ]
                },
            },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
        },
        "status": {"observedGeneration": 3, "replicas": replicas, "readyReplicas": replicas},
    }


def pod(name: str, node: str, created: str, app_: str = "web") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": f"uid-{name}",
            "resourceVersion": "950",
            "creationTimestamp": created,
            "labels": {"app": app_, "pod-template-hash": "7d9f"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app_}-7d9f",
                    "uid": "rs",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": app_,
                    "image": "web:1",
                    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
                }
            ],
        },
        "status": {"phase": "Running"},
    }


def node(
    name: str, *, virtual: bool = False, site: str = "dc-1", unschedulable: bool = False
) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "topology.kubernetes.io/region": site}
    if virtual:
        labels |= {"type": "virtual-kubelet", "tidal.io/node-kind": "virtual"}
    n: dict[str, Any] = {
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": labels},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"}},
    }
    return n


def api_for(kube: FakeKube) -> Any:
    from kubernetes import client

    from tidal.sched.controller import KubernetesApi

    cfg = client.Configuration(host=kube.url)
    return KubernetesApi(client.ApiClient(cfg))
