"""A fake Kubernetes API server on loopback that speaks the API reference's JSON.

No kube-apiserver can be installed on the build machine, so the virtual node is tested against
this: a real HTTP server (the official ``kubernetes`` client talks to it unchanged) holding
objects by resource path, with the conversation's rules as the API reference gives them:

- every write bumps one global ``resourceVersion``, stored in ``metadata.resourceVersion``;
  create fills ``uid``, ``creationTimestamp`` and ``generation`` (409 ``AlreadyExists`` for a
  name taken); a PUT whose ``resourceVersion`` is stale gets 409 ``Conflict``;
- ``PATCH`` with ``application/merge-patch+json`` (RFC 7386) or
  ``application/strategic-merge-patch+json`` (treated as a merge patch: lists are replaced,
  which is what strategic merge does for the lists the virtual node writes); other patch types
  get 415;
- the ``status`` subresource (``pods/{name}/status``, ``nodes/{name}/status``): a write there
  changes only ``status``; a write to the object itself keeps the old ``status``; a created
  pod starts as ``{"phase": "Pending"}``, a created node keeps the status it was sent (kubelets
  register with it);
- ``DELETE`` of a pod bound to a node sets ``deletionTimestamp`` and
  ``deletionGracePeriodSeconds`` (the kubelet finishes it with ``gracePeriodSeconds: 0``);
  unbound pods, a zero grace period and every other kind go at once; ``preconditions.uid``
  is checked (409);
- lists answer ``{kind}List`` with the list's ``resourceVersion``; ``labelSelector`` (``=``,
  ``==``, ``!=``, ``key``, ``!key``) and ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``, ``spec.nodeName``, ``status.phase``, with ``=``/``==``/``!=``);
- ``watch=true`` streams ``{"type": ADDED|MODIFIED|DELETED, "object": ...}`` lines from the
  given ``resourceVersion`` until ``timeoutSeconds``; an object leaving a watch's selector is
  a ``DELETED`` to that watch, one entering it an ``ADDED``; a ``resourceVersion`` older than
  the retained history (:meth:`FakeKube.compact`) gets an ``ERROR`` event holding a 410
  ``Expired`` Status, as the real server does;
- errors are ``Status`` objects (``kind: Status``, ``reason``, ``details``, ``code``).

Every request is recorded (:attr:`FakeKube.requests`) so tests assert what the client sent.
Hand-written because no maintained Python package serves the Kubernetes API (the client's own
tests mock at the urllib3 level, below the JSON this checks).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")

KINDS: dict[str, tuple[str, str, bool]] = {
    # resource -> (kind, apiVersion, namespaced)
    "pods": ("Pod", "v1", True),
    "nodes": ("Node", "v1", False),
    "namespaces": ("Namespace", "v1", False),
    "events": ("Event", "v1", True),
    "leases": ("Lease", "coordination.k8s.io/v1", True),
    "deployments": ("Deployment", "apps/v1", True),
}
"""The resources the fake serves; any other path is a 404 ``NotFound`` Status."""


def _path(*keys: str) -> Any:
    def get(obj: Obj) -> str:
        cur: Any = obj
        for k in keys:
            cur = (cur or {}).get(k) if isinstance(cur, dict) else None
        if isinstance(cur, bool):
            return "true" if cur else "false"
        return "" if cur is None else str(cur)

    return get


_META_FIELDS = {
    "metadata.name": _path("metadata", "name"),
    "metadata.namespace": _path("metadata", "namespace"),
}
FIELDS: dict[str, dict[str, Any]] = {
    "pods": _META_FIELDS
    | {
        f: _path(*f.split("."))
        for f in (
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        )
    },
    "nodes": _META_FIELDS | {"spec.unschedulable": _path("spec", "unschedulable")},
    "events": _META_FIELDS
    | {
        f: _path(*f.split("."))
        for f in (
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "type",
        )
    },
}
"""Per resource, the field labels its field selectors take (the API server's lists; any other
is a 400)."""


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status_obj(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A ``Status`` object as the API server answers a failed request."""
    out: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


class ApiFailure(Exception):
    def __init__(self, status: Obj) -> None:
        super().__init__(status["message"])
        self.status = status


def not_found(resource: str, name: str) -> ApiFailure:
    return ApiFailure(
        status_obj(
            404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource}
        )
    )


def _parse_selector(
    text: str, fields: bool, resource: str = ""
) -> list[tuple[str, str, str | None]]:
    """``a=b,c!=d,e,!f`` -> [(key, op, value)]; ops: ``=``, ``!=``, ``exists``, ``!exists``."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in raw:
            k, _, v = raw.partition("!=")
            terms.append((k.strip(), "!=", v.strip()))
        elif "=" in raw:
            k, _, v = raw.replace("==", "=").partition("=")
            terms.append((k.strip(), "=", v.strip()))
        elif fields:
            raise ApiFailure(
                status_obj(400, "BadRequest", f'invalid field selector: "{raw}": no operator')
            )
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!exists", None))
        else:
            terms.append((raw, "exists", None))
        if fields and terms[-1][0] not in FIELDS.get(resource, _META_FIELDS):
            raise ApiFailure(
                status_obj(
                    400,
                    "BadRequest",
                    f'field label not supported: "{terms[-1][0]}"',
                )
            )
    return terms


def _selected(obj: Obj, labels: list[Any], fields: list[Any], resource: str = "") -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    for k, op, v in labels:
        if (
            (op == "=" and have.get(k) != v)
            or (op == "!=" and have.get(k) == v)
            or (op == "exists" and k not in have)
            or (op == "!exists" and k in have)
        ):
            return False
    for k, op, v in fields:
        value = FIELDS.get(resource, _META_FIELDS)[k](obj)
        if (op == "=" and value != v) or (op == "!=" and value == v):
            return False
    return True


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass
class Event:
    rv: int
    type: str
    obj: Obj
    old: Obj | None
    """The object before the change (to tell a watch that it left or entered a selector)."""


@dataclass
class FakeKube:
    """The fake's state; :func:`serve` (or :class:`FakeKubeServer`) puts it on loopback."""

    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    """(resource, namespace or "", name) -> object."""
    requests: list[Request] = field(default_factory=list)
    resource_version: int = 1000
    history: list[Event] = field(default_factory=list)
    oldest_rv: int = 1000
    """Watches from before this resourceVersion get 410 Expired."""
    fail_next: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """Path prefix -> failures for the next requests to it, one consumed per request."""
    url: str = ""
    closed: bool = False
    lock: threading.Condition = field(default_factory=threading.Condition)

    # --- direct access for tests -------------------------------------------------------------

    def get(self, resource: str, name: str, namespace: str = "") -> Obj | None:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def items(self, resource: str) -> list[Obj]:
        with self.lock:
            return [copy.deepcopy(o) for (r, _, _), o in self.objects.items() if r == resource]

    def create(self, resource: str, obj: Obj) -> Obj:
        """Create as a client's POST would (status rules included)."""
        with self.lock:
            return copy.deepcopy(self._create(resource, obj["metadata"].get("namespace", ""), obj))

    def update(self, resource: str, name: str, namespace: str, change: Obj) -> Obj:
        """Merge ``change`` into the object, status included (what another controller does)."""
        with self.lock:
            key = (resource, namespace, name)
            if key not in self.objects:
                raise not_found(resource, name)
            return copy.deepcopy(self._write(key, merge_patch(self.objects[key], change)))

    def delete(
        self, resource: str, name: str, namespace: str = "", grace_s: int | None = None
    ) -> None:
        """Delete as ``kubectl delete`` does (a bound pod only gets its deletionTimestamp)."""
        with self.lock:
            self._delete(resource, namespace, name, {"gracePeriodSeconds": grace_s})

    def compact(self) -> None:
        """Forget the watch history: a watch from an older resourceVersion gets 410, and so
        does an open watch that had not yet sent every change (as the API server's watch cache
        does when a watcher falls behind its window)."""
        with self.lock:
            self.history.clear()
            self.oldest_rv = self.resource_version
            self.lock.notify_all()

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Block until ``predicate(self)`` holds (checked on every write) or the timeout."""
        with self.lock:
            return self.lock.wait_for(lambda: predicate(self), timeout_s)

    # --- the server's rules ------------------------------------------------------------------

    def _bump(self) -> int:
        self.resource_version += 1
        return self.resource_version

    def _record_event(self, type_: str, obj: Obj, old: Obj | None) -> None:
        self.history.append(Event(int(obj["metadata"]["resourceVersion"]), type_, obj, old))
        self.lock.notify_all()

    def _create(self, resource: str, namespace: str, body: Obj) -> Obj:
        kind, api_version, namespaced = KINDS[resource]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["name"] = name
        if not name:
            raise ApiFailure(
                status_obj(422, "Invalid", f"{kind} is invalid: metadata.name: Required value")
            )
        key = (resource, namespace if namespaced else "", name)
        if key in self.objects:
            raise ApiFailure(
                status_obj(
                    409,
                    "AlreadyExists",
                    f'{resource} "{name}" already exists',
                    {"name": name, "kind": resource},
                )
            )
        obj["kind"], obj["apiVersion"] = kind, api_version
        validate(resource, obj)
        if namespaced:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        if resource == "pods":
            _default_pod_spec(obj.setdefault("spec", {}))
            obj["status"] = {"phase": "Pending", "qosClass": _qos_class(obj["spec"])}
        meta["resourceVersion"] = str(self._bump())
        self.objects[key] = obj
        self._record_event("ADDED", obj, None)
        return obj

    def _write(self, key: tuple[str, str, str], new: Obj) -> Obj:
        old = self.objects[key]
        new = copy.deepcopy(new)
        validate(key[0], new)
        new["metadata"]["uid"] = old["metadata"]["uid"]
        new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = str(self._bump())
        self.objects[key] = new
        self._record_event("MODIFIED", new, old)
        return new

    def _delete(self, resource: str, namespace: str, name: str, options: Obj) -> Obj:
        key = (resource, namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            raise not_found(resource, name)
        want_uid = (options.get("preconditions") or {}).get("uid")
        if want_uid and want_uid != obj["metadata"]["uid"]:
            raise ApiFailure(
                status_obj(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource} "{name}": Precondition '
                    f"failed: UID in precondition: {want_uid}, UID in object meta: "
                    f"{obj['metadata']['uid']}",
                    {"name": name, "kind": resource, "uid": obj["metadata"]["uid"]},
                )
            )
        grace = options.get("gracePeriodSeconds")
        if resource == "pods" and (obj.get("spec") or {}).get("nodeName") and grace != 0:
            if obj["metadata"].get("deletionTimestamp"):
                return obj  # already terminating: the kubelet finishes it
            if grace is None:
                grace = int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            new = copy.deepcopy(obj)
            when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=grace)
            new["metadata"]["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
            new["metadata"]["deletionGracePeriodSeconds"] = grace
            return self._write(key, new)
        del self.objects[key]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._record_event("DELETED", gone, obj)
        return gone

    def watch_events(
        self,
        resource: str,
        namespace: str | None,
        since: int,
        labels: list[Any],
        fields: list[Any],
        until: threading.Event,
    ) -> Iterator[Obj]:
        """Events after ``since`` as a watch with these selectors sees them, until ``until``
        is set or the server closes."""
        if since < self.oldest_rv:
            yield {
                "type": "ERROR",
                "object": status_obj(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({self.oldest_rv})",
                ),
            }
            return
        pos = since
        while True:
            with self.lock:
                if pos < self.oldest_rv:  # compacted under an open watch: it must relist
                    expired = self.oldest_rv
                    pending = None
                else:
                    pending = [e for e in self.history if e.rv > pos]
            if pending is None:
                yield {
                    "type": "ERROR",
                    "object": status_obj(
                        410, "Expired", f"too old resource version: {pos} ({expired})"
                    ),
                }
                return
            with self.lock:
                if not pending:
                    if self.closed or until.is_set():
                        return
                    self.lock.wait(0.1)
                    continue
            for ev in pending:
                pos = ev.rv
                r, ns, _ = _key_of(ev.obj, resource)
                if r != resource or (namespace is not None and ns != namespace):
                    continue
                now_in = _selected(ev.obj, labels, fields, resource) and ev.type != "DELETED"
                was_in = ev.old is not None and _selected(ev.old, labels, fields, resource)
                if ev.type == "DELETED":
                    type_ = "DELETED" if was_in else None
                elif now_in and was_in:
                    type_ = "MODIFIED"
                elif now_in:
                    type_ = "ADDED"
                elif was_in:
                    type_ = "DELETED"
                else:
                    type_ = None
                if type_:
                    yield {"type": type_, "object": copy.deepcopy(ev.obj)}


def _default_pod_spec(spec: Obj) -> None:
    """The API server's defaulting of a created pod (``SetDefaults_Pod`` and friends) that the
    virtual node and kubectl see: restart policy, grace period, DNS policy, scheduler, per
    container the pull policy (Always for ``:latest`` or no tag), termination message, and
    requests taken from limits where a container gives only limits."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        image = str(c.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition("@")[0]
        latest = ":" not in tag or tag.endswith(":latest")
        c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        res = c.setdefault("resources", {})
        for k, v in (res.get("limits") or {}).items():
            res.setdefault("requests", {}).setdefault(k, v)


def _qos_class(spec: Obj) -> str:
    """The API server's QoS class: Guaranteed when every container limits cpu and memory with
    requests equal (or unset), BestEffort when none sets any, else Burstable."""
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    requests = [((c.get("resources") or {}).get("requests") or {}) for c in containers]
    limits = [((c.get("resources") or {}).get("limits") or {}) for c in containers]
    if not any(
        r.get(k) or lim.get(k)
        for r, lim in zip(requests, limits, strict=True)
        for k in ("cpu", "memory")
    ):
        return "BestEffort"
    for r, lim in zip(requests, limits, strict=True):
        for k in ("cpu", "memory"):
            if k not in lim or (k in r and str(r[k]) != str(lim[k])):
                return "Burstable"
    return "Guaranteed"


def _conflict(resource: str, name: str) -> ApiFailure:
    return ApiFailure(
        status_obj(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            {"name": name, "kind": resource},
        )
    )


_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def validate(resource: str, obj: Obj) -> None:
    """The formats the API server parses strictly: a Lease's MicroTimes (RFC 3339 with exactly
    six fraction digits, Go's ``RFC3339Micro``), and condition and container times (RFC 3339)."""
    spec = obj.get("spec") or {}
    if resource == "leases":
        for f in ("renewTime", "acquireTime"):
            if spec.get(f) is not None and not _MICRO_TIME.match(str(spec[f])):
                raise ApiFailure(
                    status_obj(
                        400,
                        "BadRequest",
                        f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                        f'"{spec[f]}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse',
                    )
                )
    status = obj.get("status") or {}
    times = [
        c.get(f)
        for c in status.get("conditions") or []
        for f in ("lastTransitionTime", "lastHeartbeatTime", "lastProbeTime")
    ]
    times.append(status.get("startTime"))
    for cs in status.get("containerStatuses") or []:
        for st in ((cs.get("state") or {}), (cs.get("lastState") or {})):
            for v in st.values():
                times += [v.get("startedAt"), v.get("finishedAt")]
    for t in times:
        if t is not None and not _TIME.match(str(t)):
            raise ApiFailure(
                status_obj(400, "BadRequest", f'parsing time "{t}" as RFC 3339: cannot parse')
            )


def _key_of(obj: Obj, resource: str) -> tuple[str, str, str]:
    for r, (kind, _, _) in KINDS.items():
        if obj.get("kind") == kind:
            return r, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
    return resource, "", ""


@dataclass(frozen=True)
class Route:
    resource: str
    namespace: str | None
    """None: across all namespaces (or a cluster-scoped resource)."""
    name: str | None
    subresource: str | None


def parse_path(path: str) -> Route:
    """``/api/v1/namespaces/ns/pods/name/status`` -> Route(pods, ns, name, status)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        rest = parts[3:]
    else:
        raise ApiFailure(status_obj(404, "NotFound", f"the server could not find {path}"))
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in KINDS:
        raise ApiFailure(status_obj(404, "NotFound", f"the server could not find {path}"))
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return Route(rest[0], namespace, name, sub)


_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
_SHORT = {"pods": ["po"], "nodes": ["no"], "namespaces": ["ns"], "events": ["ev"]}


def discovery(path: str) -> Obj | None:
    """The legacy discovery documents (``/api``, ``/apis``, ``/api/v1``, ``/apis/G/V``,
    ``/version``) a Go client such as kubectl reads before it builds its REST mapping; None for
    any other path."""
    group_versions: dict[str, list[str]] = {}
    for resource, (_, api_version, _) in KINDS.items():
        group_versions.setdefault(api_version, []).append(resource)
    if path == "/version":
        return {
            "major": "1",
            "minor": "30",
            "gitVersion": "v1.30.0-tidal-fake",
            "platform": "linux/amd64",
        }
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }
    if path == "/apis":
        groups = []
        for gv in group_versions:
            if "/" not in gv:
                continue
            group, version = gv.split("/")
            ver = {"groupVersion": gv, "version": version}
            groups.append({"name": group, "versions": [ver], "preferredVersion": ver})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    gv = path.removeprefix("/api/").removeprefix("/apis/")
    if path.startswith(("/api/", "/apis/")) and gv in group_versions:
        resources = []
        for r in group_versions[gv]:
            kind, _, namespaced = KINDS[r]
            resources.append(
                {
                    "name": r,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": _VERBS,
                    "shortNames": _SHORT.get(r, []),
                }
            )
            if r in ("pods", "nodes", "deployments"):
                resources.append(
                    {
                        "name": f"{r}/status",
                        "singularName": "",
                        "namespaced": namespaced,
                        "kind": kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }
    return None


def _handler(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        # HTTP/1.1 for the watches' chunked streams (a client reads each event as its chunk
        # arrives; without chunks urllib3 waits for 64 KiB or the end); one request per
        # connection, so that closing the server never waits on an idle keep-alive
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: Obj) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                raise ApiFailure(
                    status_obj(400, "BadRequest", "the request body is not JSON")
                ) from None

        def _serve(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            try:
                body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
                kube.requests.append(
                    Request(self.command, url.path, q, self.headers.get("Content-Type"), body)
                )
                for prefix, queue in kube.fail_next.items():
                    if url.path.startswith(prefix) and queue:
                        code, reason = queue.pop(0)
                        raise ApiFailure(status_obj(code, reason, f"{reason} (injected)"))
                doc = discovery(url.path.rstrip("/")) if self.command == "GET" else None
                if doc is not None:
                    self._send(200, doc)
                    return
                route = parse_path(url.path)
                if self.command == "GET" and route.name is None:
                    self._list_or_watch(route, q)
                    return
                code, out = self._act(route, q, body)
                self._send(code, out)
            except ApiFailure as exc:
                self._send(int(exc.status["code"]), exc.status)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def _list_or_watch(self, route: Route, q: dict[str, list[str]]) -> None:
            labels = _parse_selector((q.get("labelSelector") or [""])[0], fields=False)
            fields = _parse_selector(
                (q.get("fieldSelector") or [""])[0], fields=True, resource=route.resource
            )
            kind, api_version, _ = KINDS[route.resource]
            if (q.get("watch") or ["false"])[0] in ("true", "1"):
                with kube.lock:
                    since = int((q.get("resourceVersion") or [str(kube.resource_version)])[0] or 0)
                timeout_s = float((q.get("timeoutSeconds") or ["1800"])[0])
                self._watch(route, since, labels, fields, timeout_s)
                return
            with kube.lock:
                items = [
                    copy.deepcopy(o)
                    for (r, ns, _), o in sorted(kube.objects.items())
                    if r == route.resource
                    and (route.namespace is None or ns == route.namespace)
                    and _selected(o, labels, fields, route.resource)
                ]
                rv = str(kube.resource_version)
            self._send(
                200,
                {
                    "kind": f"{kind}List",
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                },
            )

        def _watch(
            self, route: Route, since: int, labels: list[Any], fields: list[Any], timeout_s: float
        ) -> None:
            # as the API server: 200, chunked, one JSON event per line and chunk
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            deadline = threading.Event()
            timer = threading.Timer(timeout_s, deadline.set)
            timer.daemon = True
            timer.start()
            stream = kube.watch_events(
                route.resource, route.namespace, since, labels, fields, deadline
            )
            try:
                for ev in stream:
                    line = json.dumps(ev).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                timer.cancel()

        def _act(self, route: Route, q: dict[str, list[str]], body: Any) -> tuple[int, Obj]:
            ns = route.namespace or ""
            res = route.resource
            with kube.lock:
                key = (res, ns, route.name or "")
                if self.command == "POST" and route.name is None:
                    if not isinstance(body, dict):
                        raise ApiFailure(status_obj(400, "BadRequest", "body must be an object"))
                    return 201, copy.deepcopy(kube._create(res, ns, body))
                if self.command == "POST" and route.subresource == "binding":
                    return self._bind(key, body)
                if route.subresource not in (None, "status"):
                    raise ApiFailure(
                        status_obj(404, "NotFound", f"the server could not find {self.path}")
                    )
                current = kube.objects.get(key)
                if current is None:
                    raise not_found(res, route.name or "")
                if self.command == "GET":
                    return 200, copy.deepcopy(current)
                if self.command == "DELETE":
                    options = dict(body or {})
                    if "gracePeriodSeconds" in q:
                        options["gracePeriodSeconds"] = int(q["gracePeriodSeconds"][0])
                    return 200, copy.deepcopy(kube._delete(res, ns, key[2], options))
                if self.command == "PUT":
                    if not isinstance(body, dict):
                        raise ApiFailure(status_obj(400, "BadRequest", "body must be an object"))
                    sent_rv = (body.get("metadata") or {}).get("resourceVersion")
                    if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                        raise _conflict(res, key[2])
                    new = copy.deepcopy(body)
                else:  # PATCH
                    ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                    if ctype not in MERGE_TYPES:
                        raise ApiFailure(
                            status_obj(
                                415,
                                "UnsupportedMediaType",
                                f"the body of the request was in an unknown format - accepted "
                                f"media types include: {', '.join(MERGE_TYPES)}",
                            )
                        )
                    if not isinstance(body, dict):
                        raise ApiFailure(
                            status_obj(400, "BadRequest", "a merge patch must be an object")
                        )
                    sent_rv = (body.get("metadata") or {}).get("resourceVersion")
                    if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                        raise _conflict(res, key[2])
                    new = merge_patch(current, body)
                new.setdefault("metadata", {})
                new["kind"], new["apiVersion"] = current["kind"], current["apiVersion"]
                new["metadata"]["name"] = key[2]
                if route.namespace is not None:
                    new["metadata"]["namespace"] = ns
                if route.subresource == "status":
                    kept = copy.deepcopy(current)
                    kept["status"] = new.get("status") or {}
                    new = kept
                elif res in ("pods", "nodes"):
                    new["status"] = copy.deepcopy(current.get("status") or {})
                return 200, copy.deepcopy(kube._write(key, new))

        def _bind(self, key: tuple[str, str, str], body: Any) -> tuple[int, Obj]:
            pod = kube.objects.get(("pods", key[1], key[2]))
            if pod is None:
                raise not_found("pods", key[2])
            if (pod.get("spec") or {}).get("nodeName"):
                raise ApiFailure(
                    status_obj(
                        409,
                        "Conflict",
                        f'pod {key[2]} is already assigned to node "{pod["spec"]["nodeName"]}"',
                    )
                )
            new = copy.deepcopy(pod)
            new.setdefault("spec", {})["nodeName"] = body["target"]["name"]
            kube._write(("pods", key[1], key[2]), new)
            return 201, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "code": 201,
            }

    return Handler


class FakeKubeServer:
    """:class:`FakeKube` served on a free loopback port; a context manager that joins its
    threads (watch streams end within 0.1 s of :meth:`close`)."""

    def __init__(self, kube: FakeKube | None = None) -> None:
        self.kube = kube or FakeKube()
        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.kube))
        self._srv.daemon_threads = False
        self._srv.block_on_close = True
        self.kube.url = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(
            target=self._srv.serve_forever, args=(0.05,), name="fake-kube", daemon=True
        )

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self.kube

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.kube.lock:
            self.kube.closed = True
            self.kube.lock.notify_all()
        self._srv.shutdown()
        self._srv.server_close()  # joins the request threads (block_on_close)
        self._thread.join(timeout=5)
