"""The virtual node: a Kubernetes Node whose pods run as this host's Tidal instances.

Structured as virtual-kubelet's node and pod controllers are (their facts, this code):

- node loop (every ``lease_interval_s``, 10 s as the kubelet): renew the node's Lease in
  ``kube-node-lease`` (GET once, then PUT with the last resourceVersion; 409 re-reads it) and
  refresh the node's status (capacity from the instance service, conditions, heartbeat);
- pod loop: list the pods with ``fieldSelector=spec.nodeName=<node>``, reconcile (an instance
  labelled as a pod of this node whose pod is gone is removed; a pod without an instance gets
  one), then watch from the list's resourceVersion; a 410 Gone relists and reconciles again.
  A pod with ``deletionTimestamp`` has its instance removed, then is deleted with
  ``gracePeriodSeconds: 0`` (and its uid as precondition); a ``DELETED`` pod loses its instance;
- status loop (every ``status_interval_s``): one ``GET /v1/instances`` and one
  ``GET /v1/containers`` give every pod's :func:`~tidal.vnode.mapping.pod_status`, sent through
  ``pods/{name}/status`` when it changed.

Instances are created on a small thread pool (a create waits on the runtime); a pod that cannot
run (refused spec, no capacity, image missing, any instance error) gets phase Failed with a
reason and the error's one line, and the node goes on. Only the instance API is used, over the
daemon's socket (:class:`~tidal.instance.client.InstanceClient` satisfies :class:`InstanceApi`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tidal.errors import (
    ImageError,
    ImageStoreError,
    KubeApiConflictError,
    KubeApiError,
    KubeApiGoneError,
    KubeApiNotFoundError,
    NoCapacityError,
    NotFoundError,
    PodRefusedError,
    TidalError,
)
from tidal.instance.spec import InstanceSpec
from tidal.vnode import mapping
from tidal.vnode.kube import NodeApi
from tidal.vnode.mapping import LABEL_NODE, LABEL_POD_UID, ContainerView, NodeIdentity, PodKey

log = logging.getLogger(__name__)
Obj = dict[str, Any]

LEASE_INTERVAL_S = 10.0
"""The kubelet's lease renew interval (a quarter of the 40 s lease duration)."""
STATUS_INTERVAL_S = 2.0
"""How often instance states are read and changed pod statuses sent (kubelet's PLEG: 1 s)."""
WATCH_TIMEOUT_S = 300
"""A watch's ``timeoutSeconds``: the server ends it then and the node re-watches (and how long
a stop may wait on an idle watch)."""
RETRY_S = 2.0
"""Pause after the API server or the instance service failed, before trying again."""
CREATE_WORKERS = 4
"""Instances created at once (each mostly waits on the runtime)."""


class InstanceApi(Protocol):
    """The instance API verbs the node uses (:class:`~tidal.instance.client.InstanceClient`)."""

    def run_instance(self, spec: InstanceSpec) -> dict[str, Any]: ...

    def instances(self) -> list[dict[str, Any]]: ...

    def remove_instance(self, ref: str, *, force: bool = False) -> None: ...

    def capacity(self) -> dict[str, Any]: ...

    def describe_all(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class VirtualNodeSettings:
    identity: NodeIdentity
    lease_interval_s: float = LEASE_INTERVAL_S
    status_interval_s: float = STATUS_INTERVAL_S
    watch_timeout_s: int = WATCH_TIMEOUT_S
    retry_s: float = RETRY_S
    create_workers: int = CREATE_WORKERS


def failure_reason(exc: BaseException) -> str:
    """The pod status ``reason`` for an instance that could not be made."""
    if isinstance(exc, PodRefusedError):
        return "UnsupportedPodSpec"
    if isinstance(exc, NoCapacityError):
        return "OutOfCapacity"
    if isinstance(exc, ImageError | ImageStoreError | NotFoundError):
        return "ErrImagePull"
    return "ProviderFailed"


def labels_of(instance: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (instance.get("spec") or {}).get("labels") or ()}


class VirtualNode:
    """One virtual node; :meth:`run` until a stop event is set. Thread-safe."""

    def __init__(
        self,
        kube: NodeApi,
        instances: InstanceApi,
        settings: VirtualNodeSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.instances = instances
        self.settings = settings
        self.ident = settings.identity
        self.name = self.ident.name
        self.selector = f"spec.nodeName={self.name}"
        self.clock = clock
        self._lock = threading.RLock()
        self._pods: dict[str, Obj] = {}  # uid -> the pod as last seen
        self._by_uid: dict[str, dict[str, Any]] = {}  # uid -> instance (this node's)
        self._sent: dict[str, Obj] = {}  # uid -> the status last sent
        self._busy: set[str] = set()  # uids being created or removed
        self._failed: set[str] = set()  # uids this node could not run
        self._lease: Obj | None = None
        self._node_uid: str | None = None
        self._node_status: Obj = {}
        self._pool = ThreadPoolExecutor(settings.create_workers, thread_name_prefix="tidal-vnode")
        self.lease_renewals = 0

    # --- node and lease ------------------------------------------------------------------------

    def _status(self) -> Obj:
        problem: str | None = None
        cap: dict[str, Any] | None = None
        others_cpus, others_mem = 0.0, 0
        try:
            cap = self.instances.capacity()
            for inst in self.instances.instances():
                if labels_of(inst).get(LABEL_NODE) == self.name:
                    continue
                if inst.get("status") in ("running", "creating"):
                    lim = inst.get("limits") or {}
                    others_cpus += float(lim.get("cpus") or 0)
                    others_mem += int(lim.get("memory_bytes") or 0)
        except TidalError as exc:
            problem = str(exc)
        return mapping.node_status(
            self.ident, cap, others_cpus, others_mem, problem, self._node_status, self.clock()
        )

    def register(self) -> None:
        """Create the Node, or bring an existing one's labels, taint and status up to date."""
        status = self._status()
        want = mapping.node_object(self.ident, status)
        try:
            node = self.kube.get_node(self.name)
        except KubeApiNotFoundError:
            node = self.kube.create_node(want)
            log.info("registered node %s", self.name)
        else:
            taints = [
                t
                for t in (node.get("spec") or {}).get("taints") or []
                if t.get("key") != mapping.TAINT_KEY
            ]
            node = self.kube.patch_node(
                self.name,
                {
                    "metadata": {"labels": want["metadata"]["labels"]},
                    "spec": {"taints": [*taints, *want["spec"]["taints"]]},
                },
            )
            log.info("node %s exists; labels and taint brought up to date", self.name)
        self._node_uid = node["metadata"].get("uid")
        self._node_status = self.kube.patch_node_status(self.name, {"status": status}).get(
            "status", status
        )
        self.renew_lease()

    def refresh_node_status(self) -> None:
        status = self._status()
        self._node_status = self.kube.patch_node_status(self.name, {"status": status}).get(
            "status", status
        )

    def renew_lease(self) -> None:
        """Renew the lease's renewTime (created if missing; a 409 re-reads it and retries)."""
        ns = mapping.LEASE_NAMESPACE
        want = mapping.lease_object(self.name, self._node_uid, self.clock())
        for _ in range(3):
            if self._lease is None:
                try:
                    self._lease = self.kube.get_lease(ns, self.name)
                except KubeApiNotFoundError:
                    self._lease = self.kube.create_lease(ns, want)
                    self.lease_renewals += 1
                    return
            patch = {
                "metadata": {
                    **{k: v for k, v in want["metadata"].items() if k != "namespace"},
                    "resourceVersion": self._lease["metadata"]["resourceVersion"],
                },
                "spec": want["spec"],
            }
            try:
                self._lease = self.kube.patch_lease(ns, self.name, patch)
                self.lease_renewals += 1
                return
            except (KubeApiConflictError, KubeApiNotFoundError):
                self._lease = None  # changed or removed by someone else: read it again
        raise KubeApiConflictError(f"lease {ns}/{self.name} kept changing while being renewed")

    def node_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.lease_interval_s):
            try:
                self.renew_lease()
                self.refresh_node_status()
            except TidalError as exc:
                log.warning("node %s heartbeat: %s", self.name, exc)

    # --- pods ----------------------------------------------------------------------------------

    def _refresh_instances(self) -> list[dict[str, Any]]:
        mine = [i for i in self.instances.instances() if labels_of(i).get(LABEL_NODE) == self.name]
        with self._lock:
            self._by_uid = {labels_of(i).get(LABEL_POD_UID, ""): i for i in mine}
        return mine

    def sync(self) -> str:
        """List this node's pods, reconcile instances against them; the list's
        resourceVersion (where the watch starts)."""
        pods, rv = self.kube.list_pods(self.selector)
        uids = {mapping.pod_key(p).uid for p in pods}
        for inst in self._refresh_instances():
            uid = labels_of(inst).get(LABEL_POD_UID, "")
            if uid not in uids:
                log.info(
                    "instance %s belongs to no pod of node %s; removing it", inst["name"], self.name
                )
                self._remove_instance(uid, inst["name"])
        with self._lock:
            for uid in list(self._pods):
                if uid not in uids:
                    self._forget(uid)
        for p in pods:
            self.handle({"type": "ADDED", "object": p})
        return rv

    def _forget(self, uid: str) -> None:
        with self._lock:
            self._pods.pop(uid, None)
            self._sent.pop(uid, None)
            self._failed.discard(uid)

    def handle(self, event: Obj) -> None:
        """One watch event (or a listed pod as ADDED)."""
        pod = event.get("object") or {}
        key = mapping.pod_key(pod)
        log.debug("pod %s: %s", key, event.get("type"))
        if event.get("type") == "DELETED":
            self._forget(key.uid)
            self._submit(key.uid, self._remove_for, key)
            return
        if (pod.get("spec") or {}).get("nodeName") != self.name:
            return
        with self._lock:
            self._pods[key.uid] = pod
            has_instance = key.uid in self._by_uid
            failed = key.uid in self._failed
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            self._submit(key.uid, self._terminate, key)
            return
        phase = (pod.get("status") or {}).get("phase")
        if has_instance or failed or phase in ("Succeeded", "Failed"):
            return
        self._submit(key.uid, self._create, pod)

    def _submit(self, uid: str, fn: Callable[..., None], arg: Any) -> None:
        with self._lock:
            if uid in self._busy:
                return
            self._busy.add(uid)

        def work() -> None:
            try:
                fn(arg)
            except Exception:
                log.exception("pod %s", arg if isinstance(arg, PodKey) else mapping.pod_key(arg))
            finally:
                with self._lock:
                    self._busy.discard(uid)

        self._pool.submit(work)

    def _create(self, pod: Obj) -> None:
        key = mapping.pod_key(pod)
        log.debug("pod %s: creating its instance", key)
        try:
            spec = mapping.pod_to_spec(pod, self.name)
            inst = self.instances.run_instance(spec)
        except TidalError as exc:
            # it may have raced one that succeeded (a create from an event that found a stale
            # instance list, a second node process): then the pod has its instance
            if key.uid in {labels_of(i).get(LABEL_POD_UID) for i in self._refresh_instances()}:
                return
            with self._lock:
                self._failed.add(key.uid)
            log.warning("pod %s failed: %s", key, exc)
            reason = failure_reason(exc)
            status = mapping.failed_status(
                pod, reason, str(exc), self.ident.internal_ip, self.clock()
            )
            self._event(pod, "Warning", reason, str(exc))  # before the status, as a kubelet
            self._send_status(key, status)
            return
        log.info("pod %s runs as instance %s (%s)", key, inst["name"], inst.get("ip"))
        self._event(
            pod, "Normal", "Started", f"instance {inst['name']} running, IP {inst.get('ip')}"
        )
        with self._lock:
            self._by_uid[key.uid] = inst
        self.update_statuses(made=key.uid)  # its status goes out now, not a poll later

    def _event(self, pod: Obj, type_: str, reason: str, message: str) -> None:
        """Record an Event on the pod; a failure to record is logged, not raised."""
        ev = mapping.pod_event(pod, self.name, type_, reason, message, self.clock())
        try:
            self.kube.create_event(str(ev["metadata"]["namespace"]), ev)
        except KubeApiError as exc:
            log.warning("recording event %s of pod %s: %s", reason, mapping.pod_key(pod), exc)

    def _remove_instance(self, uid: str, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self.instances.remove_instance(name, force=True)
        with self._lock:
            self._by_uid.pop(uid, None)

    def _remove_for(self, key: PodKey) -> None:
        with self._lock:
            inst = self._by_uid.get(key.uid)
        if inst is None:
            self._refresh_instances()
            with self._lock:
                inst = self._by_uid.get(key.uid)
        if inst is not None:
            self._remove_instance(key.uid, inst["name"])
            log.info("pod %s deleted; instance %s removed", key, inst["name"])

    def _terminate(self, key: PodKey) -> None:
        """deletionTimestamp set: remove the instance, then the pod (grace 0), as the kubelet."""
        self._remove_for(key)
        # gone already, or a namesake pod with another uid: not ours to delete
        with contextlib.suppress(KubeApiNotFoundError, KubeApiConflictError):
            self.kube.delete_pod(key.namespace, key.name, key.uid, 0)
        self._forget(key.uid)

    def pod_loop(self, stop: threading.Event) -> None:
        rv = ""
        while not stop.is_set():
            try:
                if not rv:
                    rv = self.sync()
                for event in self.kube.watch_pods(self.selector, rv, self.settings.watch_timeout_s):
                    obj = event.get("object") or {}
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if event.get("type") != "BOOKMARK":
                        self.handle(event)
                    if stop.is_set():
                        break
            except KubeApiGoneError as exc:
                log.info("watch of pods expired (%s); listing again", exc)
                rv = ""
            except TidalError as exc:
                if stop.is_set():
                    break  # the watch was aborted to stop
                log.warning("pods of node %s: %s", self.name, exc)
                stop.wait(self.settings.retry_s)

    # --- status --------------------------------------------------------------------------------

    def _send_status(self, key: PodKey, status: Obj) -> None:
        log.debug("pod %s: status %s", key, status.get("phase"))
        try:
            pod = self.kube.patch_pod_status(key.namespace, key.name, {"status": status})
        except KubeApiNotFoundError:
            self._forget(key.uid)
            return
        with self._lock:
            self._sent[key.uid] = status
            cached = self._pods.get(key.uid)
            if cached is not None:
                # only the status: the rest of the answer may be older than what the watch
                # delivered meanwhile (a deletionTimestamp set while this patch was in flight)
                self._pods[key.uid] = {**cached, "status": pod.get("status", status)}

    def update_statuses(self, made: str | None = None) -> None:
        """Read every instance and container once; send the statuses that changed (of pods
        no worker holds, and of ``made``, the pod whose instance the caller just made)."""
        self._refresh_instances()
        views = {str(c["id"]): ContainerView.from_api(c) for c in self.instances.describe_all()}
        now = self.clock()
        with self._lock:
            live = [
                (uid, p) for uid, p in self._pods.items() if uid not in self._busy or uid == made
            ]
            # a deletion whose instance removal failed is tried again here
            deleting = {
                uid for uid, p in live if (p.get("metadata") or {}).get("deletionTimestamp")
            }
            keys = [mapping.pod_key(p) for uid, p in live if uid in deleting]
            pods = [
                (uid, p, self._by_uid.get(uid))
                for uid, p in live
                if uid not in self._failed and uid not in deleting
            ]
            orphans: list[Obj] = []
            changed: list[tuple[PodKey, Obj]] = []
            for uid, pod, inst in pods:
                if inst is None:
                    orphans.append(pod)
                    continue
                status = mapping.pod_status(pod, inst, views, self.ident.internal_ip, now)
                if status != self._sent.get(uid):
                    changed.append((mapping.pod_key(pod), status))
        for key in keys:
            self._submit(key.uid, self._terminate, key)
        for pod in orphans:  # its instance was removed behind the node's back: make another
            if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self._submit(mapping.pod_key(pod).uid, self._create, pod)
        for key, status in changed:
            self._send_status(key, status)

    def status_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.status_interval_s):
            try:
                self.update_statuses()
            except TidalError as exc:
                log.warning("pod statuses of node %s: %s", self.name, exc)

    # --- all of it -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Register, then run the three loops until ``stop`` is set; joins them on the way out."""
        while not stop.is_set():
            try:
                self.register()
                break
            except KubeApiError as exc:
                log.warning("registering node %s: %s", self.name, exc)
                stop.wait(self.settings.retry_s)
        threads = [
            threading.Thread(target=fn, args=(stop,), name=f"tidal-vnode-{what}", daemon=True)
            for what, fn in (
                ("node", self.node_loop),
                ("pods", self.pod_loop),
                ("status", self.status_loop),
            )
        ]
        for t in threads:
            t.start()
        try:
            stop.wait()
        finally:
            self.kube.abort_watches()
            for t in threads:
                t.join()
            self._pool.shutdown(wait=True)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._pool.shutdown(wait=True)
