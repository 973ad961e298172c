"""Pure translations between Kubernetes objects (raw JSON, as the API reference gives them) and
the instance API's values: a Pod to an :class:`InstanceSpec`, an instance to a ``PodStatus``,
the node's capacity to a ``Node``, the node's ``Lease``.

No I/O: :mod:`tidal.vnode.node` reads the API server and the instance API and calls these. The
rules follow the kubelet's (and virtual-kubelet's) where the instance model allows; what it does
not allow is refused with :class:`PodRefusedError`, whose one-line message becomes the pod's
status message:

- the pod's first container is the instance's main container (its Kubernetes name kept in the
  label :data:`LABEL_MAIN_CONTAINER`); the others are members under their own names;
- ``command`` + ``args`` are the argv (the instance API replaces the image's entrypoint and cmd
  together, so ``args`` alone, which needs the image's entrypoint, is refused), with
  ``$(VAR)`` references to the container's env expanded as the kubelet expands them
  (:func:`expand`);
- ``env`` takes ``value`` (``$(VAR)`` of the variables before it expanded), and ``valueFrom``
  with a ``fieldRef`` to the pod's metadata, node and service account or a
  ``resourceFieldRef`` to the container's own CPU or memory (:func:`_field_value`,
  :func:`_resource_value`); ``secretKeyRef``/``configMapKeyRef``, ``envFrom`` and the pod's
  IP (chosen only as its sandbox is made, after the env is fixed) are refused; a
  ``hostPort`` publishes the port;
- limits (else requests) summed over the containers are the instance's ad-hoc CPUs and memory,
  unless the annotation :data:`SPEC_ANNOTATION` names instance types in fallback order;
  :data:`BANDWIDTH_ANNOTATION` (``5M``) shapes both directions;
- ``restartPolicy`` Always / OnFailure / Never -> restart always / on-failure / no.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tidal.engine.spec import PortMapping
from tidal.errors import ConfigError, PodRefusedError
from tidal.instance.identity import (
    LABEL_MAIN_CONTAINER,
    LABEL_POD_NAME,
    LABEL_POD_NAMESPACE,
    LABEL_POD_UID,
)
from tidal.instance.spec import InstanceSpec, Limits, MemberSpec, parse_rate, parse_spec_list
from tidal.sched.quantity import parse_quantity

Obj = dict[str, Any]

"""The Kubernetes name of the pod's first container (the instance calls it ``main``)."""
LABEL_NODE = "tidal.io/virtual-node"
"""Which virtual node made the instance (reconcile removes only its own)."""
SPEC_ANNOTATION = "tidal.io/instance-spec"
BANDWIDTH_ANNOTATION = "tidal.io/bandwidth"
RUNTIME_ANNOTATION = "tidal.io/runtime"
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
"""The token volume the API server adds to every pod: not mounted, not refused."""

RESTART = {"Always": "always", "OnFailure": "on-failure", "Never": "no"}
PULL = {"Always": "always", "IfNotPresent": "missing", "Never": "never"}
PROTOCOLS = {"TCP": "tcp", "UDP": "udp"}
TAINT_KEY = "virtual-kubelet.io/provider"
TAINT_VALUE = "tidal"
KUBELET_VERSION = "v1.30.0-tidal"
"""Reported as ``nodeInfo.kubeletVersion`` (virtual-kubelet reports its own build the same way)."""
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
"""The kubelet's default ``nodeLeaseDurationSeconds``."""
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")


@dataclass(frozen=True)
class PodKey:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_key(pod: Mapping[str, Any]) -> PodKey:
    meta = pod.get("metadata") or {}
    return PodKey(
        str(meta.get("namespace", "")), str(meta.get("name", "")), str(meta.get("uid", ""))
    )


def instance_name(key: PodKey) -> str:
    """A valid, unique instance name for the pod: ``<ns>-<name>`` cut to 32 characters plus 8 of
    a hash of its uid (pod names may be 253 long with dots; instance names 41, no dots)."""
    base = _NAME_CHARS.sub("-", f"{key.namespace}-{key.name}").strip("-_")[:32] or "pod"
    return f"{base}-{hashlib.sha256(key.uid.encode()).hexdigest()[:8]}"


def rfc3339(ts: float | None, micro: bool = False) -> str | None:
    """UNIX seconds as the API's ``Time`` (``MicroTime`` with ``micro``)."""
    if ts is None:
        return None
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


# --- Pod -> InstanceSpec ------------------------------------------------------------------------


def _refuse(key: PodKey, why: str) -> PodRefusedError:
    return PodRefusedError(f"pod {key} cannot run on this virtual node: {why}")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion (``third_party/forked/golang/expansion``): a
    reference to a variable of ``env`` is its value, an unknown one stays as written, ``$$``
    is one ``$`` (so ``$$(VAR)`` is the text ``$(VAR)``), and any other ``$`` is kept.
    Written out because it is Kubernetes' own rule, not a shell's or ``string.Template``'s."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 == n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # incomplete: kept, and the rest read as text
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            out.append(env.get(name, f"$({name})"))
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


_FIELD_KEYED = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def _field_value(key: PodKey, c: Mapping[str, Any], pod: Mapping[str, Any], path: str) -> str:
    """A ``fieldRef`` (the downward API's fields an env var may name) from the pod object."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
    }
    if path in simple:
        return str(simple[path] or "")
    keyed = _FIELD_KEYED.fullmatch(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    if path.startswith("status."):
        raise _refuse(
            key,
            f"container {c.get('name')!r} env fieldRef {path!r}: the pod's and host's "
            "addresses are chosen as the pod's sandbox is made, after its env is fixed",
        )
    raise _refuse(key, f"container {c.get('name')!r} env fieldRef {path!r} is unknown")


def _resource_value(key: PodKey, c: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """A ``resourceFieldRef``: the container's own limit (or request) in ``divisor`` units,
    rounded up as the kubelet rounds it. Without that figure in the container the kubelet
    gives the node's allocatable, which a virtual node does not have: refused."""
    if ref.get("containerName") not in (None, "", c.get("name")):
        raise _refuse(
            key,
            f"container {c.get('name')!r} env resourceFieldRef names container "
            f"{ref.get('containerName')!r}; only its own resources are known here",
        )
    resource = str(ref.get("resource", ""))
    table, _, what = resource.partition(".")
    if table not in ("limits", "requests") or what not in ("cpu", "memory"):
        raise _refuse(
            key, f"container {c.get('name')!r} env resourceFieldRef {resource!r} is unknown"
        )
    res = c.get("resources") or {}
    raw = (res.get(table) or {}).get(what)
    if raw is None and table == "requests":  # the API server defaults requests to limits
        raw = (res.get("limits") or {}).get(what)
    if raw is None:
        raise _refuse(
            key,
            f"container {c.get('name')!r} env resourceFieldRef {resource!r}: the container "
            f"sets no {resource} (the kubelet would give the node's allocatable)",
        )
    try:
        value = parse_quantity(raw)
        divisor = parse_quantity(ref.get("divisor") or "1")
    except ConfigError as exc:
        raise _refuse(key, f"container {c.get('name')!r} env {resource}: {exc}") from None
    if divisor <= 0:
        raise _refuse(key, f"container {c.get('name')!r} env {resource}: divisor must be > 0")
    return str(math.ceil(value / divisor - 1e-9))


def _env(key: PodKey, c: Mapping[str, Any], pod: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """In order, as the kubelet builds it: a ``value`` may refer to the variables before it."""
    out: dict[str, str] = {}
    for e in c.get("env") or []:
        name = str(e["name"])
        source = e.get("valueFrom")
        if source is None:
            out[name] = expand(str(e.get("value", "")), out)
        elif "fieldRef" in source:
            out[name] = _field_value(key, c, pod, str(source["fieldRef"].get("fieldPath", "")))
        elif "resourceFieldRef" in source:
            out[name] = _resource_value(key, c, source["resourceFieldRef"])
        else:
            kind = next(iter(source), "?")
            raise _refuse(
                key,
                f"env {name!r} of container {c.get('name')!r} uses valueFrom.{kind}; "
                "literal values, fieldRef and resourceFieldRef are supported",
            )
    if c.get("envFrom"):
        raise _refuse(key, f"container {c.get('name')!r} uses envFrom; give env values")
    return tuple(out.items())


def _argv(key: PodKey, c: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    command = [expand(str(a), env) for a in c.get("command") or []]
    args = [expand(str(a), env) for a in c.get("args") or []]
    if args and not command:
        raise _refuse(
            key,
            f"container {c.get('name')!r} gives args without command; the instance API "
            "replaces the image's entrypoint, so give the whole argv as command (+ args)",
        )
    return (*command, *args)


def _amount(key: PodKey, c: Mapping[str, Any], resource: str) -> float | None:
    res = c.get("resources") or {}
    for table in ("limits", "requests"):
        value = (res.get(table) or {}).get(resource)
        if value is not None:
            try:
                return parse_quantity(value)
            except ConfigError as exc:
                raise _refuse(
                    key, f"container {c.get('name')!r} {table}.{resource}: {exc}"
                ) from None
    return None


def _limits(
    key: PodKey, containers: Sequence[Mapping[str, Any]], annotations: Mapping[str, str]
) -> Limits:
    cpus: float | None = None
    mem: float | None = None
    if SPEC_ANNOTATION not in annotations:
        for c in containers:
            cpu = _amount(key, c, "cpu")
            m = _amount(key, c, "memory")
            if cpu is not None:
                cpus = (cpus or 0.0) + cpu
            if m is not None:
                mem = (mem or 0.0) + m
    bw: int | None = None
    if BANDWIDTH_ANNOTATION in annotations:
        try:
            bw = parse_rate(annotations[BANDWIDTH_ANNOTATION], f"annotation {BANDWIDTH_ANNOTATION}")
        except ConfigError as exc:
            raise _refuse(key, str(exc)) from None
    try:
        return Limits(
            cpus=cpus if cpus else None,
            memory_bytes=math.ceil(mem) if mem else None,
            egress_bps=bw,
            ingress_bps=bw,
        )
    except ConfigError as exc:
        raise _refuse(key, str(exc)) from None


def _ports(key: PodKey, containers: Sequence[Mapping[str, Any]]) -> tuple[PortMapping, ...]:
    out = []
    for c in containers:
        for p in c.get("ports") or []:
            if not p.get("hostPort"):
                continue  # reachable on the pod's IP; nothing to publish
            proto = PROTOCOLS.get(str(p.get("protocol", "TCP")))
            if proto is None:
                raise _refuse(
                    key, f"port protocol {p.get('protocol')!r} is not supported (TCP, UDP)"
                )
            out.append(
                PortMapping(
                    int(p["hostPort"]),
                    int(p["containerPort"]),
                    proto,
                    str(p.get("hostIP") or "0.0.0.0"),
                )
            )
    return tuple(out)


def pod_to_spec(pod: Mapping[str, Any], node_name: str) -> InstanceSpec:
    """The instance that runs ``pod``; :class:`PodRefusedError` (one line) when none can."""
    key = pod_key(pod)
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    containers = list(spec.get("containers") or [])
    if not containers:
        raise _refuse(key, "it has no containers")
    if spec.get("initContainers"):
        raise _refuse(key, "init containers are not supported")
    if spec.get("ephemeralContainers"):
        raise _refuse(key, "ephemeral containers are not supported")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        raise _refuse(
            key, "hostNetwork, hostPID and hostIPC are not supported (a pod is a sandbox)"
        )
    for c in containers:
        for vm in c.get("volumeMounts") or []:
            if vm.get("mountPath") != SERVICE_ACCOUNT_MOUNT:
                raise _refuse(
                    key,
                    f"volume {vm.get('name')!r} mounted at {vm.get('mountPath')!r} in container "
                    f"{c.get('name')!r}: volumes are not supported",
                )
    restart_policy = str(spec.get("restartPolicy") or "Always")
    if restart_policy not in RESTART:
        raise _refuse(key, f"restartPolicy {restart_policy!r} is unknown")
    restart = RESTART[restart_policy]
    first = containers[0]
    for c in containers:
        if not c.get("image"):
            raise _refuse(key, f"container {c.get('name')!r} has no image")
    pull_policy = first.get("imagePullPolicy")
    if pull_policy is not None and pull_policy not in PULL:
        raise _refuse(key, f"imagePullPolicy {pull_policy!r} is unknown")
    try:
        specs = parse_spec_list(annotations.get(SPEC_ANNOTATION))
    except ConfigError as exc:
        raise _refuse(key, f"annotation {SPEC_ANNOTATION}: {exc}") from None
    runtime = annotations.get(RUNTIME_ANNOTATION) or (spec.get("runtimeClassName") or None)
    envs = [_env(key, c, pod) for c in containers]
    try:
        members = tuple(
            MemberSpec(
                name=str(c.get("name")),
                image=str(c["image"]),
                command=_argv(key, c, dict(env)),
                env=env,
                restart=restart,
            )
            for c, env in zip(containers[1:], envs[1:], strict=True)
        )
        return InstanceSpec(
            image=str(first["image"]),
            command=_argv(key, first, dict(envs[0])),
            name=instance_name(key),
            members=members,
            specs=specs,
            limits=_limits(key, containers, annotations),
            runtime=runtime,
            ports=_ports(key, containers),
            # the instance API has no env of the main container alone: it is every container's,
            # each member's own values are laid over it (a member's same name wins)
            env=envs[0],
            labels=(
                (LABEL_POD_NAME, key.name),
                (LABEL_POD_NAMESPACE, key.namespace),
                (LABEL_POD_UID, key.uid),
                (LABEL_MAIN_CONTAINER, str(first.get("name", "main"))),
                (LABEL_NODE, node_name),
            ),
            restart=restart,
            pull=PULL[pull_policy] if pull_policy else None,
        )
    except PodRefusedError:
        raise
    except ConfigError as exc:
        raise _refuse(key, str(exc)) from None


# --- instance -> PodStatus ----------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerView:
    """What the status needs of one engine container (from ``GET /v1/containers``)."""

    id: str
    status: str
    """created, running, exited, unknown."""
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    oom_killed: bool
    starts: int
    image: str
    restarts: int = 0
    """Restarts the rich-mode init made of the main process (a restart policy other than
    Never runs the container in rich mode: the init restarts it, not the engine)."""
    last_exit: int | None = None
    restarting: bool = False

    @property
    def restart_count(self) -> int:
        return max(0, self.starts - 1) + self.restarts

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> ContainerView:
        main: Mapping[str, Any] = next(
            (s for s in d.get("services") or [] if s.get("name") == "main"), {}
        )
        return cls(
            id=str(d["id"]),
            status=str(d.get("status", "unknown")),
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
            exit_code=d.get("exit_code"),
            oom_killed=bool(d.get("oom_killed")),
            starts=int(d.get("starts") or 0),
            image=str((d.get("spec") or {}).get("image", "")),
            restarts=int(main.get("restarts") or 0),
            last_exit=main.get("last_exit"),
            restarting=main.get("state") == "restarting",
        )


def _condition(
    type_: str, ok: bool, now: str, previous: Mapping[str, Any], reason: str | None = None
) -> Obj:
    """A condition keeping its ``lastTransitionTime`` while its status stays the same."""
    status = "True" if ok else "False"
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    out: Obj = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
    if reason and not ok:
        out["reason"] = reason
    return out


def _container_status(name: str, image: str, view: ContainerView | None) -> Obj:
    out: Obj = {
        "name": name,
        "image": image,
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": view.restart_count if view else 0,
        "lastState": {},
    }
    if view is not None and view.restart_count and view.last_exit is not None:
        out["lastState"] = {
            "terminated": {
                "exitCode": view.last_exit,
                "reason": "Completed" if view.last_exit == 0 else "Error",
                "containerID": f"tidal://{view.id}",
            }
        }
    if view is None or view.status == "created" or view.started_at is None:
        out["state"] = {"waiting": {"reason": "ContainerCreating"}}
        if view is not None:
            out["containerID"] = f"tidal://{view.id}"
        return out
    out["containerID"] = f"tidal://{view.id}"
    out["imageID"] = f"tidal://{view.image or image}"
    if view.status == "running" and view.restarting:
        out["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
        return out
    if view.status == "running":
        out["state"] = {"running": {"startedAt": rfc3339(view.started_at)}}
        out["ready"] = out["started"] = True
        return out
    code = view.exit_code if view.exit_code is not None else -1
    reason = "OOMKilled" if view.oom_killed else ("Completed" if code == 0 else "Error")
    out["state"] = {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": rfc3339(view.started_at),
            "finishedAt": rfc3339(view.finished_at or view.started_at),
            "containerID": f"tidal://{view.id}",
        }
    }
    return out


def pod_status(
    pod: Mapping[str, Any],
    instance: Mapping[str, Any] | None,
    containers: Mapping[str, ContainerView],
    host_ip: str,
    now: float,
) -> Obj:
    """The ``PodStatus`` of ``pod`` run as ``instance`` (its ``GET /v1/instances/{ref}``
    answer; None: not made yet). ``containers``: the engine's containers by id. Conditions keep
    their transition times from the pod's current status while they do not change."""
    spec = pod.get("spec") or {}
    previous = pod.get("status") or {}
    k8s = [str(c.get("name")) for c in spec.get("containers") or []]
    images = [str(c.get("image", "")) for c in spec.get("containers") or []]
    members = {c["member"]: c for c in (instance or {}).get("containers") or []}
    stamp = rfc3339(now) or ""
    statuses = []
    for i, (name, image) in enumerate(zip(k8s, images, strict=True)):
        member = members.get("main" if i == 0 else name)
        view = containers.get(member["id"]) if member else None
        statuses.append(_container_status(name, image, view))
    states = [next(iter(s["state"])) for s in statuses]
    if instance is None or (instance.get("phase") == "creating"):
        phase = "Pending"
    elif "running" in states or any(
        (s["state"].get("waiting") or {}).get("reason") == "CrashLoopBackOff" for s in statuses
    ):
        phase = "Running"  # a container its init is restarting still holds the pod
    elif states and all(s == "terminated" for s in states):
        codes = [s["state"]["terminated"]["exitCode"] for s in statuses]
        phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
    else:
        phase = "Pending"
    ready = bool(statuses) and all(s["ready"] for s in statuses)
    out: Obj = {
        "phase": phase,
        "conditions": [
            _condition("PodScheduled", True, stamp, previous),
            _condition("Initialized", instance is not None, stamp, previous),
            _condition("ContainersReady", ready, stamp, previous, "ContainersNotReady"),
            _condition("Ready", ready, stamp, previous, "ContainersNotReady"),
        ],
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "containerStatuses": statuses,
        "qosClass": previous.get("qosClass") or qos_class(spec),
        "reason": None,
        "message": None,
    }
    if instance is not None:
        ip = instance.get("ip")
        out["podIP"] = ip
        out["podIPs"] = [{"ip": ip}] if ip else []
        out["startTime"] = previous.get("startTime") or rfc3339(float(instance["created_at"]))
    return out


def failed_status(
    pod: Mapping[str, Any], reason: str, message: str, host_ip: str, now: float
) -> Obj:
    """The status of a pod this node could not run: phase Failed, the reason, one line."""
    spec = pod.get("spec") or {}
    previous = pod.get("status") or {}
    stamp = rfc3339(now) or ""
    return {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": previous.get("startTime") or stamp,
        "conditions": [
            _condition("PodScheduled", True, stamp, previous),
            _condition("Initialized", False, stamp, previous, reason),
            _condition("ContainersReady", False, stamp, previous, reason),
            _condition("Ready", False, stamp, previous, reason),
        ],
        "containerStatuses": [
            {
                "name": str(c.get("name")),
                "image": str(c.get("image", "")),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "lastState": {},
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in spec.get("containers") or []
        ],
        "qosClass": previous.get("qosClass") or qos_class(spec),
    }


def pod_event(
    pod: Mapping[str, Any], node_name: str, type_: str, reason: str, message: str, now: float
) -> Obj:
    """A core/v1 ``Event`` about ``pod``, as a kubelet records one (``kubectl describe pod``
    lists them)."""
    meta = pod.get("metadata") or {}
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": "tidal-virtual-node", "host": node_name},
        "reportingComponent": "tidal-virtual-node",
        "reportingInstance": node_name,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def qos_class(spec: Mapping[str, Any]) -> str:
    """Guaranteed (every container limits cpu and memory equal to its requests), BestEffort
    (none sets any), else Burstable: the API server's rule."""
    cs = list(spec.get("containers") or [])
    any_set = False
    guaranteed = bool(cs)
    for c in cs:
        res = c.get("resources") or {}
        lim, req = res.get("limits") or {}, res.get("requests") or {}
        any_set = any_set or bool(lim) or bool(req)
        for r in ("cpu", "memory"):
            if r not in lim or (r in req and str(req[r]) != str(lim[r])):
                guaranteed = False
    if guaranteed:
        return "Guaranteed"
    return "Burstable" if any_set else "BestEffort"


# --- Node and Lease -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """What the ``Node`` says about this host besides capacity."""

    name: str
    region: str
    internal_ip: str
    hostname: str
    kubelet_port: int
    max_pods: int
    kernel: str = platform.release()
    arch: str = platform.machine()


_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def node_labels(ident: NodeIdentity) -> dict[str, str]:
    """The labels of deploy/virtual-node.yaml plus the kubelet's well-known ones."""
    labels = {
        "type": "virtual-kubelet",
        "tidal.io/node-kind": "virtual",
        "kubernetes.io/hostname": ident.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": _ARCH.get(ident.arch, ident.arch),
        "kubernetes.io/role": "agent",
        "node.kubernetes.io/exclude-from-external-load-balancers": "true",
    }
    if ident.region:
        labels["topology.kubernetes.io/region"] = ident.region
    return labels


def resources(cpus: float, memory_bytes: int, pods: int) -> dict[str, str]:
    """A ``ResourceList``: CPUs in millicores, memory in Ki (as kubelets report them)."""
    return {
        "cpu": f"{max(0, math.floor(cpus * 1000))}m",
        "memory": f"{max(0, memory_bytes) // 1024}Ki",
        "pods": str(max(0, pods)),
    }


def node_status(
    ident: NodeIdentity,
    capacity: Mapping[str, Any] | None,
    others_cpus: float,
    others_memory_bytes: int,
    problem: str | None,
    previous: Mapping[str, Any],
    now: float,
) -> Obj:
    """``NodeStatus`` from the instance service's ``/v1/node/capacity`` (None: unreachable).

    Capacity is what the service may reserve; allocatable leaves out what instances that are not
    pods of this node hold (``tidal instance run`` on the same host). ``problem`` (or no
    capacity) makes the node not Ready, with the reason in its message."""
    stamp = rfc3339(now) or ""
    cap = capacity or {}
    cpus, mem = float(cap.get("cpus") or 0), int(cap.get("memory_bytes") or 0)
    ready = capacity is not None and problem is None
    conds = []
    for type_, ok, reason, msg in (
        (
            "Ready",
            ready,
            "KubeletReady" if ready else "InstanceServiceUnavailable",
            "tidal instance service is ready" if ready else (problem or "no capacity answer"),
        ),
        ("MemoryPressure", False, "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
        ("DiskPressure", False, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", False, "KubeletHasSufficientPID", "kubelet has sufficient PID"),
        ("NetworkUnavailable", False, "RouteCreated", "instances use the node's bridge"),
    ):
        status = "True" if ok else "False"
        old = next((c for c in previous.get("conditions") or [] if c.get("type") == type_), None)
        since = old["lastTransitionTime"] if old and old.get("status") == status else stamp
        conds.append(
            {
                "type": type_,
                "status": status,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": since,
                "reason": reason,
                "message": msg,
            }
        )
    return {
        "capacity": resources(cpus, mem, ident.max_pods),
        "allocatable": resources(cpus - others_cpus, mem - others_memory_bytes, ident.max_pods),
        "conditions": conds,
        "addresses": [
            {"type": "InternalIP", "address": ident.internal_ip},
            {"type": "Hostname", "address": ident.hostname},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": ident.kubelet_port}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": ident.kernel,
            "osImage": "Tidal elastic instances",
            "containerRuntimeVersion": "tidal://0.1.0",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": _ARCH.get(ident.arch, ident.arch),
        },
    }


def node_object(ident: NodeIdentity, status: Obj) -> Obj:
    """The ``Node`` to register (labels and taint of deploy/virtual-node.yaml)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": ident.name,
            "labels": node_labels(ident),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [{"key": TAINT_KEY, "value": TAINT_VALUE, "effect": "NoSchedule"}]},
        "status": status,
    }


def lease_object(node_name: str, node_uid: str | None, now: float) -> Obj:
    """The node's ``coordination.k8s.io/v1`` Lease in ``kube-node-lease``, renewed at ``now``."""
    meta: Obj = {"name": node_name, "namespace": LEASE_NAMESPACE}
    if node_uid:
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}
        ]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": node_name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": rfc3339(now, micro=True),
        },
    }
