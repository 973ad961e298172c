"""The virtual node's Kubernetes API calls, over the official ``kubernetes`` client, on raw JSON.

:class:`NodeApi` is the one interface; :class:`KubernetesNodeApi` implements it with the
client's ``CoreV1Api`` and ``CoordinationV1Api`` (responses read raw with
``_preload_content=False``, so objects stay the API's JSON rather than the client's models,
which drop fields they do not know). Errors are translated here, by status, into the
:class:`~tidal.errors.KubeApiError` tree (:func:`tidal.sched.kube_status.api_error`: 404 not
found, 409 conflict, 410 gone).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tidal.errors import KubeApiUnavailableError
from tidal.sched.kube_status import call, call_raw, load_api_client, watch_events

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


class NodeApi(Protocol):
    """What the virtual node asks of the API server."""

    def get_node(self, name: str) -> Obj: ...

    def create_node(self, body: Obj) -> Obj: ...

    def patch_node(self, name: str, patch: Obj) -> Obj: ...

    def patch_node_status(self, name: str, patch: Obj) -> Obj: ...

    def get_lease(self, namespace: str, name: str) -> Obj: ...

    def create_lease(self, namespace: str, body: Obj) -> Obj: ...

    def patch_lease(self, namespace: str, name: str, patch: Obj) -> Obj:
        """A merge patch; one holding ``metadata.resourceVersion`` fails with 409 when the
        lease changed since (the API server checks it as a precondition)."""
        ...

    def list_pods(self, field_selector: str) -> tuple[list[Obj], str]:
        """Pods of every namespace matching the selector, and the list's resourceVersion."""
        ...

    def watch_pods(
        self, field_selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[Obj]:
        """Watch events ``{"type", "object"}`` until the server ends the watch; an ``ERROR``
        event raises its status' error (410: :class:`~tidal.errors.KubeApiGoneError`)."""
        ...

    def patch_pod_status(self, namespace: str, name: str, patch: Obj) -> Obj: ...

    def delete_pod(self, namespace: str, name: str, uid: str, grace_s: int) -> None: ...

    def create_event(self, namespace: str, body: Obj) -> None: ...

    def abort_watches(self) -> None:
        """End the open watches now and any opened later (a stopping node does not wait out
        ``timeoutSeconds``)."""
        ...


class KubernetesNodeApi:
    """:class:`NodeApi` over the official client."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._coord = client.CoordinationV1Api(api_client)
        self._watches: set[Any] = set()
        self._watch_lock = threading.Lock()
        self._watches_aborted = False

    @classmethod
    def from_kubeconfig(cls, path: Path | None, context: str | None = None) -> KubernetesNodeApi:
        """``path`` or ``~/.kube/config``; with neither given, the in-cluster service account."""
        return cls(load_api_client(path, context))

    @classmethod
    def for_url(cls, url: str) -> KubernetesNodeApi:
        """An unauthenticated client of ``url`` (tests: the fake API server on loopback)."""
        from kubernetes import client

        return cls(client.ApiClient(client.Configuration(host=url)))

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call(what, fn, *args, **kwargs)

    def _raw(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        return call_raw(what, fn, *args, **kwargs)

    def get_node(self, name: str) -> Obj:
        return self._raw(f"get node {name}", self._core.read_node, name)

    def create_node(self, body: Obj) -> Obj:
        return self._raw(f"create node {body['metadata']['name']}", self._core.create_node, body)

    def patch_node(self, name: str, patch: Obj) -> Obj:
        return self._raw(
            f"patch node {name}", self._core.patch_node, name, patch, _content_type=MERGE_PATCH
        )

    def patch_node_status(self, name: str, patch: Obj) -> Obj:
        return self._raw(
            f"patch node {name} status",
            self._core.patch_node_status,
            name,
            patch,
            _content_type=MERGE_PATCH,
        )

    def get_lease(self, namespace: str, name: str) -> Obj:
        return self._raw(
            f"get lease {namespace}/{name}", self._coord.read_namespaced_lease, name, namespace
        )

    def create_lease(self, namespace: str, body: Obj) -> Obj:
        return self._raw(
            f"create lease {namespace}/{body['metadata']['name']}",
            self._coord.create_namespaced_lease,
            namespace,
            body,
        )

    def patch_lease(self, namespace: str, name: str, patch: Obj) -> Obj:
        """A merge patch rather than the kubelet's PUT: the client turns a PUT's body into its
        ``V1Lease`` model and back, which writes ``renewTime`` by ``isoformat()``, without the
        fraction when the microseconds are 0, and the API server's MicroTime needs all six
        digits; a patch body is sent as given."""
        return self._raw(
            f"renew lease {namespace}/{name}",
            self._coord.patch_namespaced_lease,
            name,
            namespace,
            patch,
            _content_type=MERGE_PATCH,
        )

    def list_pods(self, field_selector: str) -> tuple[list[Obj], str]:
        doc = self._raw(
            "list pods", self._core.list_pod_for_all_namespaces, field_selector=field_selector
        )
        rv = str((doc.get("metadata") or {}).get("resourceVersion", ""))
        return list(doc.get("items") or []), rv

    def watch_pods(
        self, field_selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[Obj]:
        """Raw watch lines. The client's ``Watch`` is not used: with raw JSON it fails on
        ``ERROR`` events and retries a 410 itself, where the caller must relist."""
        from urllib3.exceptions import HTTPError

        resp = self._call(
            "watch pods",
            self._core.list_pod_for_all_namespaces,
            field_selector=field_selector,
            resource_version=resource_version,
            timeout_seconds=timeout_s,
            allow_watch_bookmarks=True,
            watch=True,
            _preload_content=False,
        )
        with self._watch_lock:
            self._watches.add(resp)
            if self._watches_aborted:  # opened while the node was stopping
                with contextlib.suppress(Exception):
                    resp.shutdown()
        try:
            yield from watch_events("watch pods", resp)
        except (HTTPError, OSError) as exc:
            if self._watches_aborted:
                return  # ended by abort_watches: the caller is stopping
            raise KubeApiUnavailableError(
                f"Kubernetes API connection lost during watch pods: {exc}"
            ) from exc
        finally:
            with self._watch_lock:
                self._watches.discard(resp)
            with contextlib.suppress(Exception):
                resp.release_conn()

    def create_event(self, namespace: str, body: Obj) -> None:
        self._call(
            f"record event in {namespace}",
            self._core.create_namespaced_event,
            namespace,
            body,
            _preload_content=False,
        )

    def abort_watches(self) -> None:
        """Shut the open watch responses' sockets: their readers return at once; a watch
        opened after this is shut as it opens (the node is stopping)."""
        with self._watch_lock:
            self._watches_aborted = True
            open_ = list(self._watches)
        for resp in open_:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def patch_pod_status(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self._raw(
            f"patch pod {namespace}/{name} status",
            self._core.patch_namespaced_pod_status,
            name,
            namespace,
            patch,
            _content_type=MERGE_PATCH,
        )

    def delete_pod(self, namespace: str, name: str, uid: str, grace_s: int) -> None:
        """DELETE with ``gracePeriodSeconds`` and a uid precondition (never a namesake pod)."""
        self._call(
            f"delete pod {namespace}/{name}",
            self._core.delete_namespaced_pod,
            name,
            namespace,
            body={"gracePeriodSeconds": grace_s, "preconditions": {"uid": uid}},
            grace_period_seconds=grace_s,
            _preload_content=False,
        )
