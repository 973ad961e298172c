"""Controller mode: keep deletion costs and owned-node thresholds current in a real cluster.

It watches Deployments labelled ``tidal.io/hybrid=enabled`` and, for each, (1) annotates its
pods with ``controller.kubernetes.io/pod-deletion-cost`` so that a stock ReplicaSet controller
scales in virtual pods first (cordoned ones first, newest first) and owned pods last;
(2) resolves the service's threshold: the operator's ``tidal.io/owned-threshold`` annotation if
set, else Tidal's policy (:mod:`tidal.sched.policy`, the one the simulator evaluates) fitted on the
replica history the controller has recorded, and writes
it as ``tidal.io/predicted-threshold``; (3) publishes thresholds, replicas on owned nodes and
the node cache to the extender's :class:`~tidal.sched.extender.ViewStore`.

The Kubernetes API is reached through :class:`KubeApi`, one small interface; the adapter over
the official ``kubernetes`` client translates its errors into :class:`KubeApiError`. Everything
else (quantities, snapshots, plans) is pure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tidal.errors import (
    ConfigError,
    KubeApiConflictError,
    KubeApiError,
    KubeApiGoneError,
    KubeApiNotFoundError,
    KubeApiUnavailableError,
)
from tidal.fsutil import write_json_atomic
from tidal.ids import NodeName
from tidal.sched.autoscale import MINUTES_PER_DAY
from tidal.sched.extender import ExtenderView, NodeInfo, ViewStore, free_capacity
from tidal.sched.kube_status import api_error as api_error  # re-exported
from tidal.sched.kube_status import call, call_raw, load_api_client, watch_events
from tidal.sched.model import ClusterSnapshot, OwnedNode, Pod, Resources, VirtualPool, VirtualSpec
from tidal.sched.placement import DELETION_COST_ANNOTATION, deletion_costs
from tidal.sched.policy import TidalPolicy
from tidal.sched.quantity import parse_quantity as parse_quantity  # re-exported
from tidal.sched.quantity import pod_requests, resources_of
from tidal.sched.settings import (
    ENABLED_LABEL,
    PREDICTED_ANNOTATION,
    SERVICE_LABEL,
    THRESHOLD_ANNOTATION,
    SchedSettings,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ENABLED_SELECTOR = f"{ENABLED_LABEL}=enabled"
MERGE_PATCH = "application/merge-patch+json"


class _Fitted(Protocol):
    @property
    def threshold_replicas(self) -> int: ...


class ThresholdFitter(Protocol):
    """What the controller asks of a policy: a threshold from a replica history (the
    simulator's :class:`~tidal.sched.policy.TidalPolicy` by default)."""

    def fit(self, history: np.ndarray) -> _Fitted: ...


class KubeApi(Protocol):
    """The few API calls the controller makes, on raw JSON objects."""

    def list_deployments(self, namespace: str | None, selector: str) -> tuple[list[Obj], str]:
        """Items and the list's resourceVersion."""
        ...

    def watch_deployments(
        self, namespace: str | None, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[Obj]:
        """Watch events ``{"type", "object"}`` until the server ends the watch."""
        ...

    def list_pods(self, namespace: str, selector: str) -> list[Obj]: ...

    def list_all_pods(self) -> list[Obj]:
        """Every pod bound to a node and not finished (what holds node capacity)."""
        ...

    def list_nodes(self) -> list[Obj]: ...

    def patch_pod(self, namespace: str, name: str, patch: Obj) -> None: ...

    def patch_deployment(self, namespace: str, name: str, patch: Obj) -> None: ...

    def patch_node(self, name: str, patch: Obj) -> None: ...

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None: ...


class KubernetesApi:
    """:class:`KubeApi` over the official ``kubernetes`` client (raw JSON, merge patches)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)

    @classmethod
    def from_kubeconfig(cls, path: Path | None, context: str | None = None) -> KubernetesApi:
        return cls(load_api_client(path, context))

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call(what, fn, *args, **kwargs)

    def _raw(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        return call_raw(what, fn, *args, **kwargs)

    def list_deployments(self, namespace: str | None, selector: str) -> tuple[list[Obj], str]:
        if namespace:
            doc = self._raw(
                "list deployments",
                self._apps.list_namespaced_deployment,
                namespace,
                label_selector=selector,
            )
        else:
            doc = self._raw(
                "list deployments",
                self._apps.list_deployment_for_all_namespaces,
                label_selector=selector,
            )
        return list(doc.get("items") or []), str(
            (doc.get("metadata") or {}).get("resourceVersion", "")
        )

    def watch_deployments(
        self, namespace: str | None, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[Obj]:
        """Raw watch events. The client's ``Watch`` is not used: with ``deserialize=False`` it
        fails on the server's ``ERROR`` events (it reads a key only deserialised events have)
        and it retries a 410 itself; here an ``ERROR`` event becomes the error of its status
        code (410: :class:`KubeApiGoneError`, the caller relists)."""
        from urllib3.exceptions import HTTPError

        fn = (
            self._apps.list_namespaced_deployment
            if namespace
            else self._apps.list_deployment_for_all_namespaces
        )
        args = (namespace,) if namespace else ()
        resp = self._call(
            "watch deployments",
            fn,
            *args,
            label_selector=selector,
            resource_version=resource_version,
            timeout_seconds=timeout_s,
            watch=True,
            _preload_content=False,
        )
        try:
            yield from watch_events("watch deployments", resp)
        except HTTPError as exc:
            raise KubeApiUnavailableError(
                f"Kubernetes API connection lost during watch deployments: {exc}"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        doc = self._raw(
            "list pods", self._core.list_namespaced_pod, namespace, label_selector=selector
        )
        return list(doc.get("items") or [])

    def list_all_pods(self) -> list[Obj]:
        doc = self._raw(
            "list pods of all namespaces",
            self._core.list_pod_for_all_namespaces,
            field_selector="spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed",
        )
        return list(doc.get("items") or [])

    def list_nodes(self) -> list[Obj]:
        return list(self._raw("list nodes", self._core.list_node).get("items") or [])

    def patch_pod(self, namespace: str, name: str, patch: Obj) -> None:
        self._call(
            f"patch pod {namespace}/{name}",
            self._core.patch_namespaced_pod,
            name,
            namespace,
            patch,
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )

    def patch_deployment(self, namespace: str, name: str, patch: Obj) -> None:
        self._call(
            f"patch deployment {namespace}/{name}",
            self._apps.patch_namespaced_deployment,
            name,
            namespace,
            patch,
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        """POST a v1 Binding (the extender's bind verb); the raw response avoids the client's
        Binding deserialisation, which rejects the Status object the server answers with."""
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        self._call(
            f"bind pod {namespace}/{name} to {node}",
            self._core.create_namespaced_pod_binding,
            name,
            namespace,
            body,
            _preload_content=False,
        )

    def patch_node(self, name: str, patch: Obj) -> None:
        self._call(
            f"patch node {name}",
            self._core.patch_node,
            name,
            patch,
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )


# --- pure part -------------------------------------------------------------------------------


def _epoch(ts: str | None) -> float:
    if not ts:
        return 0.0
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


_ANY_SPEC = (VirtualSpec("any", Resources(1 << 40, 1 << 40), 0.0),)
"""A virtual kubelet takes whatever fits its provider; specs matter for placement, not here."""


def snapshot_from_k8s(
    nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], ceiling: float
) -> ClusterSnapshot:
    """Owned nodes, virtual pools (one per virtual node) and placed pods from API objects."""
    owned, pools = [], []
    for n in nodes:
        info = NodeInfo.from_k8s(n)
        labels = (n.get("metadata") or {}).get("labels") or {}
        if info.virtual:
            pools.append(
                VirtualPool(
                    info.name,
                    NodeName(info.name),
                    info.site or info.name,
                    _ANY_SPEC,
                    labels=labels,
                    cordoned=info.unschedulable,
                )
            )
        else:
            cap = resources_of((n.get("status") or {}).get("allocatable") or {})
            owned.append(OwnedNode(NodeName(info.name), cap, ceiling, labels, info.unschedulable))
    placed = []
    for p in pods:
        meta = p.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        labels = meta.get("labels") or {}
        node = (p.get("spec") or {}).get("nodeName")
        placed.append(
            Pod(
                str(meta.get("name")),
                str(labels.get(SERVICE_LABEL, "")),
                pod_requests(p),
                NodeName(node) if node else None,
                created_s=_epoch(meta.get("creationTimestamp")),
            )
        )
    return ClusterSnapshot(tuple(owned), tuple(pools), tuple(placed))


def service_of(deployment: Mapping[str, Any]) -> str:
    meta = deployment.get("metadata") or {}
    return str((meta.get("labels") or {}).get(SERVICE_LABEL) or meta.get("name"))


def selector_of(deployment: Mapping[str, Any]) -> str:
    match = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if not match:
        name = (deployment.get("metadata") or {}).get("name")
        raise ConfigError(f"deployment {name} has no spec.selector.matchLabels; Tidal needs one")
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


@dataclass(frozen=True)
class DeploymentPlan:
    namespace: str
    name: str
    service: str
    threshold: int | None
    owned_replicas: int
    pod_patches: dict[str, Obj]
    deployment_patch: Obj | None


def plan_deployment(
    deployment: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    predicted: int | None,
    ceiling: float,
) -> DeploymentPlan:
    """The patches that bring one Deployment and its pods to Tidal's desired annotations."""
    meta = deployment.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    service = service_of(deployment)
    manual_text = annotations.get(THRESHOLD_ANNOTATION)
    threshold = predicted
    if manual_text is not None:
        try:
            threshold = int(manual_text)
        except ValueError:
            raise ConfigError(
                f"deployment {meta.get('namespace')}/{meta.get('name')}: annotation "
                f"{THRESHOLD_ANNOTATION}={manual_text!r} is not an integer"
            ) from None
    # the service label on pods may be missing: the deployment's pods are its service
    relabelled = [
        {
            **p,
            "metadata": {
                **(p.get("metadata") or {}),
                "labels": {
                    **((p.get("metadata") or {}).get("labels") or {}),
                    SERVICE_LABEL: service,
                },
            },
        }
        for p in pods
    ]
    snap = snapshot_from_k8s(nodes, relabelled, ceiling)
    costs = deletion_costs(snap, service)
    patches: dict[str, Obj] = {}
    for p in pods:
        pmeta = p.get("metadata") or {}
        name = str(pmeta.get("name"))
        if name not in costs:
            continue
        want = str(costs[name])
        if (pmeta.get("annotations") or {}).get(DELETION_COST_ANNOTATION) != want:
            patches[name] = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: want}}}
    owned_names = {n.name for n in snap.owned}
    on_owned = sum(1 for p in snap.pods if p.node in owned_names)
    want_ann = None if threshold is None else str(threshold)
    dep_patch = None
    if annotations.get(PREDICTED_ANNOTATION) != want_ann:
        dep_patch = {"metadata": {"annotations": {PREDICTED_ANNOTATION: want_ann}}}
    return DeploymentPlan(
        str(meta.get("namespace", "default")),
        str(meta.get("name")),
        service,
        threshold,
        on_owned,
        patches,
        dep_patch,
    )


@dataclass
class ReplicaHistory:
    """Replica counts per minute, as the controller observed them (fill-forward).

    Bounded: only the last ``max_minutes`` are kept (the predictor trains on whole recent
    days), so a controller that runs for months holds a week, not months.
    """

    start_minute: int | None = None
    counts: list[float] = field(default_factory=list)
    max_minutes: int = 8 * MINUTES_PER_DAY

    def record(self, minute: int, replicas: float) -> None:
        if self.start_minute is None:
            self.start_minute = minute
        idx = minute - self.start_minute
        if idx < 0:
            return  # the clock stepped back: a minute already past is not rewritten
        if idx >= len(self.counts) + self.max_minutes:
            self.start_minute, self.counts = minute, [replicas]  # away longer than we keep
            return
        if idx < len(self.counts):
            self.counts[idx] = max(self.counts[idx], replicas)
        else:
            last = self.counts[-1] if self.counts else replicas
            self.counts.extend([last] * (idx - len(self.counts)))
            self.counts.append(replicas)
        self._trim()

    def _trim(self) -> None:
        excess = len(self.counts) - self.max_minutes
        if excess > 0 and self.start_minute is not None:
            del self.counts[:excess]
            self.start_minute += excess

    def whole_days(self) -> np.ndarray:
        days = len(self.counts) // MINUTES_PER_DAY
        return np.asarray(self.counts[-days * MINUTES_PER_DAY :] if days else [], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "start_minute": self.start_minute, "counts": self.counts}

    @classmethod
    def from_json(cls, doc: Any, max_minutes: int, where: str) -> ReplicaHistory:
        """Inverse of :meth:`to_json`; anything else is a :class:`ConfigError` naming ``where``."""
        ok = (
            isinstance(doc, dict)
            and doc.get("version") == 1
            and isinstance(doc.get("start_minute"), int)
            and isinstance(doc.get("counts"), list)
            and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0
                for c in doc["counts"]
            )
        )
        if not ok:
            raise ConfigError(f"{where}: not a Tidal replica history (version 1)")
        hist = cls(doc["start_minute"], [float(c) for c in doc["counts"]], max_minutes)
        hist._trim()  # a smaller train_days since it was written
        return hist


class HistoryStore:
    """Replica histories on disk, one JSON file per service, so a restart keeps its days.

    Written atomically at most once per recorded minute; a file that does not parse is set
    aside as ``<name>.bad`` with a warning, and that service starts a new history.
    """

    def __init__(self, directory: Path, max_minutes: int) -> None:
        self.directory = directory
        self.max_minutes = max_minutes
        self._saved_len: dict[str, tuple[int | None, int]] = {}

    def path(self, service: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", service) or "_"
        return self.directory / f"{safe}.json"

    def load(self, service: str) -> ReplicaHistory:
        path = self.path(service)
        try:
            doc = json.loads(path.read_text())
            hist = ReplicaHistory.from_json(doc, self.max_minutes, str(path))
        except FileNotFoundError:
            return ReplicaHistory(max_minutes=self.max_minutes)
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("replica history %s is unusable (%s); starting a new one", path, exc)
            with contextlib.suppress(OSError):
                path.replace(path.with_suffix(".bad"))
            return ReplicaHistory(max_minutes=self.max_minutes)
        self._saved_len[service] = (hist.start_minute, len(hist.counts))
        return hist

    def save(self, service: str, hist: ReplicaHistory) -> None:
        """Write if a minute was added since the last write; a failure is logged, not raised."""
        stamp = (hist.start_minute, len(hist.counts))
        if self._saved_len.get(service) == stamp:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path(service), hist.to_json())
        except OSError as exc:
            log.warning("cannot save replica history of %s: %s", service, exc)
            return
        self._saved_len[service] = stamp


@dataclass(frozen=True)
class ReconcileReport:
    deployments: int
    pods_patched: int
    deployments_patched: int
    thresholds: dict[str, int | None]


class Controller:
    """Reconciles Tidal-managed Deployments; ``run`` loops on a watch with periodic resync."""

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str | None = None,
        settings: SchedSettings | None = None,
        store: ViewStore | None = None,
        predictor: ThresholdFitter | None = None,
        clock: Callable[[], float] = time.time,
        history_dir: Path | None = None,
    ) -> None:
        """``history_dir``: where replica histories persist (``None``: memory only, tests)."""
        self.api = api
        self.namespace = namespace
        self.settings = settings or SchedSettings()
        self.store = store
        self.predictor: ThresholdFitter = predictor or TidalPolicy(
            price_ratio=self.settings.price_ratio,
            lead_minutes=math.ceil(self.settings.creation_latency_s / 60.0 - 1e-9),
        )
        self.clock = clock
        self.history: dict[str, ReplicaHistory] = {}
        self._history_minutes = (self.settings.train_days + 1) * MINUTES_PER_DAY
        self.history_store = (
            HistoryStore(history_dir, self._history_minutes) if history_dir is not None else None
        )
        self._thresholds: dict[str, int] = {}
        self._owned: dict[str, int] = {}
        self._pods_seen: list[Obj] = []
        self._started_at: float | None = None
        self._synced_at: float | None = None
        self._last_error: Exception | None = None
        self._stopped: str | None = None
        self.backoff_initial_s = 1.0
        """First wait after a failed pass; doubles up to 60 s."""

    def _predicted(self, service: str, replicas: float) -> int | None:
        hist = self.history.get(service)
        if hist is None:
            if self.history_store is not None:
                hist = self.history_store.load(service)
            else:
                hist = ReplicaHistory(max_minutes=self._history_minutes)
            self.history[service] = hist
        hist.record(int(self.clock() // 60), replicas)
        if self.history_store is not None:
            self.history_store.save(service, hist)
        days = hist.whole_days()
        if days.size < MINUTES_PER_DAY:
            return None
        return self.predictor.fit(days).threshold_replicas

    def reconcile(self, deployment: Obj, nodes: list[Obj]) -> tuple[DeploymentPlan, int]:
        """One Deployment: annotate its pods and its threshold.

        A pod deleted between the list and the patch (404) or changed under it (409) is
        skipped: the next pass sees the cluster as it is then. Returns the plan and the number
        of pods actually patched.
        """
        meta = deployment.get("metadata") or {}
        namespace = str(meta.get("namespace", "default"))
        pods = self.api.list_pods(namespace, selector_of(deployment))
        replicas = float((deployment.get("spec") or {}).get("replicas") or 0)
        plan = plan_deployment(
            deployment,
            pods,
            nodes,
            self._predicted(service_of(deployment), replicas),
            self.settings.ceiling,
        )
        patched = 0
        for pod_name, patch in plan.pod_patches.items():
            try:
                self.api.patch_pod(namespace, pod_name, patch)
            except (KubeApiNotFoundError, KubeApiConflictError) as exc:
                log.debug("skipped pod %s/%s: %s", namespace, pod_name, exc)
                continue
            patched += 1
        if plan.deployment_patch is not None:
            try:
                self.api.patch_deployment(namespace, plan.name, plan.deployment_patch)
            except KubeApiNotFoundError:
                log.debug("deployment %s/%s was deleted meanwhile", namespace, plan.name)
                self._forget(plan.service)
                return plan, patched
            except KubeApiConflictError as exc:
                log.debug("deployment %s/%s: %s; next pass", namespace, plan.name, exc)
        if plan.threshold is None:
            self._thresholds.pop(plan.service, None)
        else:
            self._thresholds[plan.service] = plan.threshold
        self._owned[plan.service] = plan.owned_replicas
        return plan, patched

    def _forget(self, service: str) -> None:
        self._thresholds.pop(service, None)
        self._owned.pop(service, None)

    def _publish(self, nodes: list[Obj]) -> None:
        if self.store is None:
            return
        infos = {i.name: i for i in (NodeInfo.from_k8s(n) for n in nodes)}
        sites = tuple(dict.fromkeys(i.site for i in infos.values() if i.virtual and i.site))
        old = self.store.get()
        self.store.set(
            ExtenderView(
                dict(self._thresholds),
                dict(self._owned),
                infos,
                old.site_order or sites,
                old.cordoned_sites,
                old.failed_sites,
                free=free_capacity(nodes, self._pods_seen, self.settings.ceiling),
            )
        )

    def reconcile_all(self) -> tuple[ReconcileReport, str]:
        """Every managed Deployment. A Deployment deleted meanwhile (404 on its pods) is
        dropped; one with a bad annotation does not stop the others: the first such error is
        raised after all were reconciled and the view was published."""
        deployments, rv = self.api.list_deployments(self.namespace, ENABLED_SELECTOR)
        nodes = self.api.list_nodes()
        pods_patched = deps_patched = 0
        thresholds: dict[str, int | None] = {}
        first_bad: ConfigError | None = None
        seen = set()
        self._pods_seen = self.api.list_all_pods()
        for d in deployments:
            try:
                plan, n = self.reconcile(d, nodes)
            except KubeApiNotFoundError as exc:
                log.debug("deployment %s vanished: %s", (d.get("metadata") or {}).get("name"), exc)
                continue
            except ConfigError as exc:
                log.error("%s", exc)
                first_bad = first_bad or exc
                continue
            seen.add(plan.service)
            pods_patched += n
            deps_patched += plan.deployment_patch is not None
            thresholds[plan.service] = plan.threshold
        for gone in set(self._thresholds) | set(self._owned):
            if gone not in seen and first_bad is None:
                self._forget(gone)
        self._publish(nodes)
        if first_bad is not None:
            raise first_bad
        return ReconcileReport(len(deployments), pods_patched, deps_patched, thresholds), rv

    # --- the loop and its health -------------------------------------------------------------

    @property
    def stale_after_s(self) -> float:
        """The view counts as stale when no pass succeeded for this long (three resyncs, at
        least 90 s: a watch that times out normally renews it every resync interval)."""
        return max(3 * self.settings.resync_interval_s, 90.0)

    def health_problem(self) -> str | None:
        """Why the extender's view should not be trusted now, or None.

        The loop stopped (a bug or an interrupt): always. The API refused the controller
        (401/403, other 4xx): at once, since waiting will not cure it. Anything else (the API
        server unreachable, 5xx): only once no pass has succeeded for :attr:`stale_after_s`.
        """
        if self._stopped is not None:
            return f"scheduler controller stopped: {self._stopped}"
        err = self._last_error
        if err is not None and not isinstance(err, (KubeApiUnavailableError, KubeApiGoneError)):
            return f"scheduler controller cannot reconcile: {err}"
        since = self._synced_at if self._synced_at is not None else self._started_at
        if since is not None:
            age = self.clock() - since
            if age > self.stale_after_s:
                what = "synced" if self._synced_at is not None else "completed a first pass"
                cause = f": {err}" if err is not None else ""
                return f"scheduler controller has not {what} for {age:.0f}s{cause}"
        return None

    def _ok(self) -> None:
        self._synced_at = self.clock()
        self._last_error = None

    def run(self, stop: threading.Event, max_cycles: int | None = None) -> None:
        """Watch Deployments; reconcile each event; full resync whenever a watch ends.

        It survives what a real API server answers: a 410 on the watch (the resourceVersion
        expired) relists at once, however often; 404/409 on a patch skip that object;
        5xx/unreachable back off exponentially; 401/403 and other refusals are logged, make
        :meth:`health_problem` report them, and are retried with the same backoff (RBAC may be
        fixed meanwhile). Only ``stop`` ends the loop; if anything else does (a bug), the
        reason stays in :meth:`health_problem`.
        """
        self._started_at = self.clock()
        try:
            self._loop(stop, max_cycles)
        except BaseException as exc:
            self._stopped = f"{type(exc).__name__}: {exc}"
            log.exception("scheduler controller loop ended")
            raise
        if not stop.is_set() and max_cycles is None:
            self._stopped = "the loop returned"

    def _loop(self, stop: threading.Event, max_cycles: int | None) -> None:
        cycles = 0
        backoff = self.backoff_initial_s
        gone_in_a_row = 0
        while not stop.is_set() and (max_cycles is None or cycles < max_cycles):
            cycles += 1
            try:
                _, rv = self.reconcile_all()
                self._ok()
                timeout = max(1, int(self.settings.resync_interval_s))
                for event in self.api.watch_deployments(
                    self.namespace, ENABLED_SELECTOR, rv, timeout
                ):
                    if stop.is_set():
                        return
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        nodes = self.api.list_nodes()
                        # deleted meanwhile: its DELETED event or the resync follows
                        with contextlib.suppress(KubeApiNotFoundError):
                            self.reconcile(event.get("object") or {}, nodes)
                        self._publish(nodes)
                    elif event.get("type") == "DELETED":
                        self._forget(service_of(event.get("object") or {}))
                        self._publish(self.api.list_nodes())
                    self._ok()
                backoff = self.backoff_initial_s
                gone_in_a_row = 0
                self._ok()
            except KubeApiGoneError as exc:
                # the watch's resourceVersion expired: relist now; if it keeps happening (a
                # server compacting faster than we list), slow down a little
                gone_in_a_row += 1
                self._last_error = exc
                log.info("%s; relisting", exc)
                if gone_in_a_row > 3:
                    stop.wait(min(gone_in_a_row - 3, 30))
            except KubeApiUnavailableError as exc:
                self._last_error = exc
                log.warning("%s; retrying in %.0fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
            except (KubeApiError, ConfigError) as exc:
                self._last_error = exc
                log.error("%s; retrying in %.0fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)


def cordon_site(api: KubeApi, site: str, *, on: bool = True) -> list[str]:
    """Cordon (or uncordon) every virtual node of ``site`` in one call; returns their names."""
    names = []
    for n in api.list_nodes():
        info = NodeInfo.from_k8s(n)
        if info.virtual and (info.site == site or info.name == site):
            api.patch_node(info.name, {"spec": {"unschedulable": True if on else None}})
            names.append(info.name)
    if not names:
        raise ConfigError(
            f"no virtual node in site {site!r}; check the region label of the virtual nodes"
        )
    return names
