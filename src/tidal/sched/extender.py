"""kube-scheduler extender: filter and prioritize nodes by Tidal's owned/virtual policy.

kube-scheduler POSTs ``ExtenderArgs`` (``k8s.io/kube-scheduler/extender/v1``) to
``<urlPrefix>/filter`` and ``<urlPrefix>/prioritize``. Those Go types carry no JSON tags, so
the keys are the Go field names: ``Pod`` (a full v1 Pod), and either ``Nodes`` (a v1 NodeList
of full objects) or, with ``nodeCacheCapable: true``, ``NodeNames``. Filter answers an
``ExtenderFilterResult`` (``Nodes``/``NodeNames``, ``FailedNodes``,
``FailedAndUnresolvableNodes``, ``Error``); prioritize answers a ``HostPriorityList``
(``[{"Host", "Score"}]``, scores 0..10, multiplied by the extender's weight). With a binder,
``<urlPrefix>/bind`` takes ``ExtenderBindingArgs`` (``PodName``, ``PodNamespace``, ``PodUID``,
``Node``), creates the Binding and answers ``ExtenderBindingResult`` (``Error``): the extender
then counts every placement the moment it happens, instead of at the controller's next resync,
so a burst of pods cannot overshoot a threshold. ``<urlPrefix>/preempt`` takes
``ExtenderPreemptionArgs`` (``Pod``, and ``NodeNameToVictims`` with full v1 Pods or, with
``nodeCacheCapable``, ``NodeNameToMetaVictims`` with ``{"UID"}`` only; the other key is
``null``) and answers ``ExtenderPreemptionResult`` (``NodeNameToMetaVictims``): the nodes on
which preemption may go ahead, with their victims unchanged; kube-scheduler drops the others.

The decision is pure (:func:`filter_nodes`, :func:`prioritize`) over an :class:`ExtenderView`
that the controller keeps current (thresholds, replicas of each service on owned nodes, the
node cache for name-only requests, cordoned pools and failed sites). The HTTP server is a thin
adapter around it on the service kit (:mod:`tidal.service`): ``/healthz``, ``/metrics``
(decisions by verb and result, nodes kept and failed by filter), and errors in the kit's shape
with the protocol's ``Error`` field beside it. The policy is the resource policy's: owned nodes while the service
is below its threshold, virtual nodes (in site order, never cordoned or failed) above it; if
the preferred kind has no candidate, the other one is allowed (``prefer`` strategy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from prometheus_client import Counter

from tidal.errors import ConfigError, NotFoundError, SchedError, TidalError
from tidal.sched.model import Resources
from tidal.sched.quantity import holds_resources, pod_requests, resources_of
from tidal.sched.settings import NODE_KIND_LABEL, SERVICE_LABEL, SITE_LABEL
from tidal.service.server import HealthCheck, Request, Route, Service, TcpServiceServer

log = logging.getLogger(__name__)

MAX_EXTENDER_PRIORITY = 10
"""``extenderv1.MaxExtenderPriority``."""


class ExtenderArgs(TypedDict, total=False):
    Pod: dict[str, Any]
    Nodes: dict[str, Any] | None
    NodeNames: list[str] | None


class ExtenderFilterResult(TypedDict):
    Nodes: dict[str, Any] | None
    NodeNames: list[str] | None
    FailedNodes: dict[str, str]
    FailedAndUnresolvableNodes: dict[str, str]
    Error: str


class HostPriority(TypedDict):
    Host: str
    Score: int


class ExtenderBindingArgs(TypedDict):
    PodName: str
    PodNamespace: str
    PodUID: str
    Node: str


class ExtenderBindingResult(TypedDict):
    Error: str


class MetaPod(TypedDict):
    UID: str


class MetaVictims(TypedDict):
    Pods: list[MetaPod]
    NumPDBViolations: int


class ExtenderPreemptionArgs(TypedDict, total=False):
    Pod: dict[str, Any]
    NodeNameToVictims: dict[str, dict[str, Any]] | None
    NodeNameToMetaVictims: dict[str, MetaVictims] | None


class ExtenderPreemptionResult(TypedDict):
    NodeNameToMetaVictims: dict[str, MetaVictims]


class Binder(Protocol):
    """Creates the pod's Binding in the API server (the controller's Kubernetes adapter)."""

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None: ...


@dataclass(frozen=True)
class NodeInfo:
    """What the extender needs of a v1 Node."""

    name: str
    virtual: bool
    site: str | None = None
    unschedulable: bool = False

    @classmethod
    def from_k8s(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = node.get("spec") or {}
        virtual = (
            labels.get(NODE_KIND_LABEL) == "virtual" or labels.get("type") == "virtual-kubelet"
        )
        return cls(
            name=str(meta.get("name", "")),
            virtual=virtual,
            site=labels.get(SITE_LABEL),
            unschedulable=bool(spec.get("unschedulable", False)),
        )


def free_capacity(
    nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], ceiling: float
) -> dict[str, Resources]:
    """What each owned (non-virtual) node can still take under the utilisation ceiling:
    allocatable x ceiling (GPUs whole) minus the requests of the pods bound to it. Negative
    amounts (a node already above its ceiling) are kept as zero."""
    used: dict[str, Resources] = {}
    for p in pods:
        if holds_resources(p):
            name = str(p["spec"]["nodeName"])
            used[name] = used.get(name, Resources()) + pod_requests(p)
    out: dict[str, Resources] = {}
    for n in nodes:
        info = NodeInfo.from_k8s(n)
        if info.virtual:
            continue
        alloc = resources_of((n.get("status") or {}).get("allocatable") or {}).scaled(ceiling)
        u = used.get(info.name, Resources())
        out[info.name] = Resources(
            max(0, alloc.cpu_milli - u.cpu_milli),
            max(0, alloc.memory_mib - u.memory_mib),
            max(0, alloc.gpu - u.gpu),
        )
    return out


@dataclass(frozen=True)
class ExtenderView:
    """A frozen picture of the cluster; swapped whole when the controller learns more."""

    thresholds: Mapping[str, int] = field(default_factory=dict)
    owned_replicas: Mapping[str, int] = field(default_factory=dict)
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    site_order: tuple[str, ...] = ()
    cordoned_sites: frozenset[str] = frozenset()
    failed_sites: frozenset[str] = frozenset()
    free: Mapping[str, Resources] = field(default_factory=dict)
    """What each owned node can still take under its ceiling (allocatable x ceiling minus the
    requests of the pods bound to it); a node not listed is not checked."""


SEEN_PODS_LIMIT = 10_000
"""Pods remembered between filter and bind (uid -> service); the oldest are forgotten."""


class ViewStore:
    """Holds the current :class:`ExtenderView`; readers take it without copying.

    Between the controller's refreshes it counts bindings itself: filter remembers which
    service a pod uid belongs to, bind then adds the pod to that service's owned count.
    """

    def __init__(self, view: ExtenderView | None = None) -> None:
        self._view = view or ExtenderView()
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, tuple[str | None, Resources]] = OrderedDict()
        self.health_source: Callable[[], str | None] | None = None
        """Set by whoever keeps the view current (the controller's ``health_problem``)."""

    def get(self) -> ExtenderView:
        return self._view

    def set(self, view: ExtenderView) -> None:
        with self._lock:
            self._view = view

    def health_problem(self) -> str | None:
        """None while the view can be trusted; else one line saying why not (``/healthz``
        answers 503 with it). A store nobody keeps current (a static thresholds file) is
        healthy."""
        source = self.health_source
        return None if source is None else source()

    def remember(
        self, pod_uid: str, service: str | None, requests: Resources | None = None
    ) -> None:
        with self._lock:
            self._seen[pod_uid] = (service, requests or Resources())
            self._seen.move_to_end(pod_uid)
            while len(self._seen) > SEEN_PODS_LIMIT:
                self._seen.popitem(last=False)

    def record_binding(self, pod_uid: str, node: str) -> None:
        """Count a pod just bound to an owned node against its service's threshold and take
        its requests from the node's free capacity."""
        with self._lock:
            service, requests = self._seen.pop(pod_uid, (None, Resources()))
            info = self._view.nodes.get(node)
            if info is not None and info.virtual:
                return
            changes: dict[str, Any] = {}
            if service is not None:
                counts = dict(self._view.owned_replicas)
                counts[service] = counts.get(service, 0) + 1
                changes["owned_replicas"] = counts
            left = self._view.free.get(node)
            if left is not None:
                free = dict(self._view.free)
                free[node] = Resources(
                    max(0, left.cpu_milli - requests.cpu_milli),
                    max(0, left.memory_mib - requests.memory_mib),
                    max(0, left.gpu - requests.gpu),
                )
                changes["free"] = free
            if changes:
                self._view = dataclasses.replace(self._view, **changes)


def _service(pod: Mapping[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    svc = labels.get(SERVICE_LABEL)
    return str(svc) if svc else None


def _candidates(args: ExtenderArgs, view: ExtenderView) -> tuple[list[NodeInfo], dict[str, Any]]:
    nodes = args.get("Nodes")
    if nodes is not None:
        items = nodes.get("items") or []
        return [NodeInfo.from_k8s(n) for n in items], {n["metadata"]["name"]: n for n in items}
    names = args.get("NodeNames")
    if names is None:
        raise SchedError("extender request has neither Nodes nor NodeNames")
    # name-only requests (nodeCacheCapable): classify from the controller's node cache
    return [view.nodes.get(n) or NodeInfo(n, virtual=False) for n in names], {}


def _unusable(node: NodeInfo, view: ExtenderView) -> str | None:
    if not node.virtual:
        return None
    if node.site in view.failed_sites:
        return f"tidal: site {node.site} has failed; virtual node {node.name} takes no pods"
    if node.unschedulable or node.site in view.cordoned_sites:
        return f"tidal: virtual node {node.name} is cordoned; uncordon it to place pods there"
    return None


def _prefers_owned(service: str, view: ExtenderView) -> tuple[bool, str]:
    threshold = view.thresholds.get(service)
    on_owned = view.owned_replicas.get(service, 0)
    if threshold is None:
        return True, f"{service} has no threshold: owned nodes first"
    if on_owned < threshold:
        return True, f"{service} has {on_owned} of {threshold} replicas on owned nodes"
    return False, (
        f"{service} has reached its owned-node threshold ({on_owned}/{threshold}); "
        "further replicas go to virtual nodes"
    )


def _requests(pod: Mapping[str, Any] | None) -> Resources:
    """The pod's requests; a quantity that does not parse is the request's error."""
    try:
        return pod_requests(pod or {})
    except ConfigError as exc:
        name = ((pod or {}).get("metadata") or {}).get("name")
        raise SchedError(f"pod {name}: {exc}") from exc


def _lacks(node: NodeInfo, requests: Resources, view: ExtenderView) -> str | None:
    """Why an owned node cannot hold the pod within its ceiling (None: it can, or unknown)."""
    if node.virtual:
        return None
    free = view.free.get(node.name)
    if free is None or requests.fits_in(free):
        return None
    return (
        f"tidal: owned node {node.name} has {free} free under its utilisation ceiling; "
        f"the pod requests {requests}"
    )


def filter_nodes(args: ExtenderArgs, view: ExtenderView) -> ExtenderFilterResult:
    """The nodes the pod may go to under Tidal's policy, and why the others may not.

    Owned nodes whose free capacity under the ceiling (from the view) cannot hold the pod's
    requests fail first: a threshold counts replicas, but a replica must also fit.
    """
    pod = args.get("Pod") or {}
    nodes, raw = _candidates(args, view)
    failed: dict[str, str] = {}
    unresolvable: dict[str, str] = {}
    usable = []
    requests = _requests(pod) if view.free else Resources()
    for n in nodes:
        why = _unusable(n, view)
        if why:
            unresolvable[n.name] = why
        elif lack := _lacks(n, requests, view):
            failed[n.name] = lack
        else:
            usable.append(n)
    service = _service(pod)
    if service is None:
        keep = usable  # not a Tidal-managed pod: no opinion beyond cordons
    else:
        owned_first, reason = _prefers_owned(service, view)
        preferred = [n for n in usable if n.virtual != owned_first]
        other = [n for n in usable if n.virtual == owned_first]
        if preferred:
            keep = preferred
            for n in other:
                failed[n.name] = f"tidal: {reason}"
        else:
            keep = other  # prefer strategy: the next unit when the preferred one has no room
    names = [n.name for n in keep]
    if args.get("Nodes") is not None:
        items = [raw[n] for n in names]
        return ExtenderFilterResult(
            Nodes={"metadata": {}, "items": items},
            NodeNames=None,
            FailedNodes=failed,
            FailedAndUnresolvableNodes=unresolvable,
            Error="",
        )
    return ExtenderFilterResult(
        Nodes=None,
        NodeNames=names,
        FailedNodes=failed,
        FailedAndUnresolvableNodes=unresolvable,
        Error="",
    )


def prioritize(args: ExtenderArgs, view: ExtenderView) -> list[HostPriority]:
    """Scores 0..10: the preferred kind high, virtual sites in declared order, cordoned 0."""
    pod = args.get("Pod") or {}
    nodes, _ = _candidates(args, view)
    service = _service(pod)
    owned_first = True if service is None else _prefers_owned(service, view)[0]
    order = {site: i for i, site in enumerate(view.site_order)}
    out: list[HostPriority] = []
    for n in nodes:
        if _unusable(n, view):
            score = 0
        elif n.virtual:
            rank = order.get(n.site or "", len(order))
            top = MAX_EXTENDER_PRIORITY if not owned_first else MAX_EXTENDER_PRIORITY // 2
            score = max(1, top - rank)
        else:
            score = MAX_EXTENDER_PRIORITY if owned_first else 1
        out.append(HostPriority(Host=n.name, Score=score))
    return out


def _meta_victims(args: ExtenderPreemptionArgs) -> dict[str, MetaVictims]:
    meta = args.get("NodeNameToMetaVictims")
    if meta is not None:
        return {
            node: MetaVictims(
                Pods=[MetaPod(UID=str(p["UID"])) for p in (v.get("Pods") or [])],
                NumPDBViolations=int(v.get("NumPDBViolations") or 0),
            )
            for node, v in meta.items()
        }
    full = args.get("NodeNameToVictims")
    if full is None:
        raise SchedError(
            "extender preemption request has neither NodeNameToVictims nor NodeNameToMetaVictims"
        )
    out = {}
    for node, v in full.items():
        pods = []
        for pod in v.get("Pods") or []:
            uid = (pod.get("metadata") or {}).get("uid")
            if not uid:
                raise SchedError(f"victim on node {node} has no metadata.uid")
            pods.append(MetaPod(UID=str(uid)))
        out[node] = MetaVictims(Pods=pods, NumPDBViolations=int(v.get("NumPDBViolations") or 0))
    return out


def preempt(args: ExtenderPreemptionArgs, view: ExtenderView) -> ExtenderPreemptionResult:
    """The candidate nodes on which evicting the scheduler's victims makes sense for Tidal.

    Never a virtual node: each of its pods is an instance of its own, so evicting one frees
    nothing another pod could use. Owned nodes only while the filter would send the pod there:
    a service at its threshold goes to a usable virtual node instead, and evicting owned pods
    for it would push it over the threshold (and the filter would refuse the node afterwards).
    Names are classified with the controller's node cache; unknown names count as owned.
    """
    victims = _meta_victims(args)
    service = _service(args.get("Pod") or {})
    owned_ok = True
    if service is not None and not _prefers_owned(service, view)[0]:
        owned_ok = not any(n.virtual and not _unusable(n, view) for n in view.nodes.values())
    keep: dict[str, MetaVictims] = {}
    for name, v in victims.items():
        node = view.nodes.get(name) or NodeInfo(name, virtual=False)
        if not node.virtual and owned_ok:
            keep[name] = v
    return ExtenderPreemptionResult(NodeNameToMetaVictims=keep)


def bind(args: ExtenderBindingArgs, binder: Binder, store: ViewStore) -> ExtenderBindingResult:
    """Bind the pod and count it at once; errors go back in ``Error`` as kube-scheduler expects."""
    try:
        name, namespace = args["PodName"], args["PodNamespace"]
        uid, node = args["PodUID"], args["Node"]
    except KeyError as exc:
        return ExtenderBindingResult(Error=f"ExtenderBindingArgs lacks {exc.args[0]}")
    try:
        binder.bind_pod(namespace, name, uid, node)
    except SchedError as exc:
        return ExtenderBindingResult(Error=str(exc))
    store.record_binding(uid, node)
    return ExtenderBindingResult(Error="")


# --- HTTP (the service kit) -----------------------------------------------------------------


def _extender_error_fields(exc: BaseException, message: str) -> dict[str, str]:
    """kube-scheduler reads ``Error``; the kit's ``error`` object stands beside it."""
    return {"Error": message}


class ExtenderServer(TcpServiceServer):
    """The HTTP adapter; ``start()`` serves in a thread (tests), ``serve_forever()`` blocks.

    Verbs are the last path segment, so any ``urlPrefix`` works; ``<prefix>/healthz`` answers
    the kit's health (``health_checks``: the controller loop may add its own).
    """

    def __init__(
        self,
        store: ViewStore,
        host: str = "127.0.0.1",
        port: int = 0,
        binder: Binder | None = None,
    ) -> None:
        self.store = store
        self.binder = binder
        self.decisions = Counter(
            "tidal_sched_extender_decisions",
            "Extender calls answered, by verb and result",
            ["verb", "result"],
            registry=None,
        )
        self.filtered_nodes = Counter(
            "tidal_sched_extender_filtered_nodes",
            "Nodes judged by filter: kept, failed (policy), unresolvable (cordoned, failed site)",
            ["outcome"],
            registry=None,
        )
        service = Service(
            "the extender",
            [
                Route("GET", "{prefix:path}/healthz", lambda _: self.service.health(), "healthz"),
                Route("POST", "{prefix:path}/{verb}", self._post, "verb"),
            ],
            error=SchedError,
            error_fields=_extender_error_fields,
        )
        service.registry.register(self.decisions)
        service.registry.register(self.filtered_nodes)
        for verb in ("filter", "prioritize", "preempt", "bind"):  # every series from the start
            for result in ("ok", "error"):
                self.decisions.labels(verb, result)
        for outcome in ("kept", "failed", "unresolvable"):
            self.filtered_nodes.labels(outcome)
        service.health_checks.append(store.health_problem)  # the controller loop's, if any
        super().__init__(host, port, service)

    @property
    def health_checks(self) -> list[HealthCheck]:
        """Checks ``/healthz`` runs (each ``None`` when fine, else the problem)."""
        return self.service.health_checks

    def _args(self, req: Request) -> dict[str, Any]:
        try:
            args = json.loads(req.body or b"{}")
            if not isinstance(args, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            raise ConfigError(f"request body is not ExtenderArgs JSON: {exc}") from None
        return args

    def _post(self, req: Request) -> Any:
        verb = req.params["verb"]
        try:
            result = self._answer(verb, self._args(req))
        except TidalError:
            self.decisions.labels(verb, "error").inc()
            raise
        error = result.get("Error") if isinstance(result, dict) else None
        self.decisions.labels(verb, "error" if error else "ok").inc()
        return result

    def _answer(self, verb: str, args: dict[str, Any]) -> Any:
        store = self.store
        view = store.get()
        try:
            if verb == "filter":
                pod_meta = (args.get("Pod") or {}).get("metadata") or {}
                service = _service(args.get("Pod") or {})
                if pod_meta.get("uid"):
                    store.remember(str(pod_meta["uid"]), service, _requests(args.get("Pod")))
                result = filter_nodes(args, view)  # type: ignore[arg-type]
                self.filtered_nodes.labels("kept").inc(
                    len(result["NodeNames"] or []) + len((result["Nodes"] or {}).get("items") or [])
                )
                self.filtered_nodes.labels("failed").inc(len(result["FailedNodes"]))
                self.filtered_nodes.labels("unresolvable").inc(
                    len(result["FailedAndUnresolvableNodes"])
                )
                return result
            if verb == "bind" and self.binder is not None:
                return bind(args, self.binder, store)  # type: ignore[arg-type]
            if verb == "prioritize":
                return prioritize(args, view)  # type: ignore[arg-type]
            if verb == "preempt":
                return preempt(args, view)  # type: ignore[arg-type]
        except SchedError as exc:
            if verb == "filter":  # the protocol's way: a 200 whose Error kube-scheduler reads
                return ExtenderFilterResult(
                    Nodes=None,
                    NodeNames=None,
                    FailedNodes={},
                    FailedAndUnresolvableNodes={},
                    Error=str(exc),
                )
            raise ConfigError(str(exc)) from None  # a request the extender cannot judge: 400
        hint = "filter, prioritize, preempt" + (", bind" if self.binder else "")
        raise NotFoundError(f"unknown verb {verb!r}; use {hint}")
