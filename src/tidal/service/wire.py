"""Errors on the wire: the one table from Tidal's error tree to HTTP statuses, and back.

Every Tidal service answers a failed request with the status :func:`status_for` picks from
:data:`ERROR_STATUS` and the body :func:`error_body` makes::

    {"error": {"type": "ContainerNotFoundError", "message": "no container 'web'; see tidal ps"}}

(the scheduler extender adds the Kubernetes protocol's ``Error`` field beside it). A client
turns that body back into the same :mod:`tidal.errors` class with the same message
(:func:`error_from_response`), so a remote failure reads exactly like a local one: the CLI
prints ``error: <message>``. Error statuses are chosen here and nowhere else; this module
imports neither httpx nor the server, so clients load it for nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tidal import errors
from tidal.errors import (
    AuthenticationError,
    BlobRangeError,
    ConfigError,
    ContainerStateError,
    InstanceStateError,
    NotFoundError,
    RetryableError,
    TidalError,
)

if TYPE_CHECKING:
    import httpx

ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (AuthenticationError, 401),
    (NotFoundError, 404),
    (ContainerStateError, 409),
    (InstanceStateError, 409),
    (BlobRangeError, 416),
    (ConfigError, 400),
    (RetryableError, 503),
    (TidalError, 500),
)
"""First match wins. Bad input is a 400, something missing a 404, a transient failure a 503
(a retry may cure it), anything else Tidal raised on purpose a 500."""

INTERNAL_ERROR_STATUS = 500
"""A bug (an exception outside the Tidal tree): the service keeps serving and says so."""

HEALTH_FAILING_STATUS = 503
"""``/healthz`` when a health check names a problem: load balancers and kubelets take any
status >= 400 as failing, and 503 says that it may pass again."""


def status_for(exc: BaseException) -> int:
    """The HTTP status of a failed request that raised ``exc``."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return INTERNAL_ERROR_STATUS


def error_body(exc: BaseException, type_name: str | None = None) -> dict[str, Any]:
    """The one error shape: ``{"error": {"type": <class name>, "message": <str(exc)>}}``."""
    return {"error": {"type": type_name or type(exc).__name__, "message": str(exc)}}


def error_class(name: object, fallback: type[TidalError]) -> type[TidalError]:
    """The :mod:`tidal.errors` class called ``name``, or ``fallback`` for anything else."""
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, TidalError):
        return cls
    return fallback


def error_from_body(
    status: int, content: bytes, *, fallback: type[TidalError], what: str
) -> TidalError:
    """The error a failed answer carries: the sender's class and message when the body has
    the kit's shape, else ``fallback`` with one line naming ``what`` answered what."""
    try:
        err = json.loads(content)["error"]
        return error_class(err["type"], fallback)(str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = " ".join(content.decode("utf-8", "replace").split())[:300]
        return fallback(f"{what} answered HTTP {status}: {text or '(no body)'}")


def error_from_response(
    resp: httpx.Response, *, fallback: type[TidalError], what: str
) -> TidalError | None:
    """``None`` for a success, else the error a failed httpx response carries."""
    if resp.status_code < 400:
        return None
    return error_from_body(resp.status_code, resp.content, fallback=fallback, what=what)


def raise_for_error(resp: httpx.Response, *, fallback: type[TidalError], what: str) -> None:
    """Raise the error a failed response carries (the client side of :func:`error_body`)."""
    exc = error_from_response(resp, fallback=fallback, what=what)
    if exc is not None:
        raise exc
