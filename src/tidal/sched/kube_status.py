"""What the two adapters over the official Kubernetes client share: the one table from an API
status code to the :class:`KubeApiError` subclass, loading a kubeconfig, and a call whose
client errors become that tree.

Used by the scheduler's controller and the virtual node (:mod:`tidal.vnode.kube`). The client
is imported inside the functions, so this module loads without it (and without the ``sched``
extra's numpy).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tidal.errors import (
    KubeApiConflictError,
    KubeApiError,
    KubeApiForbiddenError,
    KubeApiGoneError,
    KubeApiNotFoundError,
    KubeApiUnavailableError,
)

_STATUS_ERRORS: dict[int, type[KubeApiError]] = {
    401: KubeApiForbiddenError,
    403: KubeApiForbiddenError,
    404: KubeApiNotFoundError,
    409: KubeApiConflictError,
    410: KubeApiGoneError,
    429: KubeApiUnavailableError,
}


def api_error(status: int, message: str) -> KubeApiError:
    """The most specific :class:`KubeApiError` for an HTTP status (the one status table)."""
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = KubeApiUnavailableError if status >= 500 or status == 0 else KubeApiError
    return cls(message)


def load_api_client(path: Path | None, context: str | None = None) -> Any:
    """An ``ApiClient`` from ``path`` or ``~/.kube/config``; with neither given and inside a
    cluster, from the pod's service account. A bad or missing kubeconfig is one line."""
    import yaml
    from kubernetes import client, config

    try:
        if path is None:
            try:
                config.load_incluster_config()
                return client.ApiClient()
            except config.ConfigException:
                pass
        return config.new_client_from_config(
            config_file=str(path) if path else None, context=context
        )
    except (config.ConfigException, OSError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise KubeApiError(
            f"cannot load kubeconfig {path or '~/.kube/config'}: {exc}; pass --kubeconfig "
            "or run inside the cluster with a service account"
        ) from exc


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` of the client; its errors as the :class:`KubeApiError` of
    their status (the API's own message kept), an unreachable server as unavailable."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        status = exc.status or 0
        detail = (exc.reason or "").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(exc.body or "{}").get("message", detail)
        raise api_error(status, f"Kubernetes API: {what} failed ({status}): {detail}") from exc
    except HTTPError as exc:
        raise KubeApiUnavailableError(f"Kubernetes API unreachable during {what}: {exc}") from exc


def call_raw(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`call` for the raw JSON (the client's models are not used: they rewrite what
    they do not know)."""
    resp = call(what, fn, *args, _preload_content=False, **kwargs)
    try:
        doc: dict[str, Any] = json.loads(resp.data)
    except ValueError as exc:
        raise KubeApiUnavailableError(f"Kubernetes API: {what} answered non-JSON: {exc}") from exc
    return doc


def watch_events(what: str, resp: Any) -> Iterator[dict[str, Any]]:
    """The events of a raw watch response (one JSON object a line); an ``ERROR`` event is
    the error of its status code (410: :class:`KubeApiGoneError`, the caller relists)."""
    from kubernetes.watch.watch import iter_resp_lines

    for line in iter_resp_lines(resp):
        if not line.strip():
            continue
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise KubeApiUnavailableError(
                f"Kubernetes API: {what} sent a line that is not JSON: {exc}"
            ) from exc
        if event.get("type") == "ERROR":
            obj = event.get("object") or {}
            code = int(obj.get("code") or 500)
            raise api_error(
                code,
                f"Kubernetes API: {what} failed ({code}): "
                f"{obj.get('message') or obj.get('reason') or 'ERROR event'}",
            )
        yield event
