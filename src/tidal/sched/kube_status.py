"""The one table from a Kubernetes API status code to the :class:`KubeApiError` subclass.

Shared by the scheduler's controller and the virtual node (:mod:`tidal.vnode.kube`), both
adapters over the official client; nothing here imports the client, so the table loads
without the ``sched`` extra's numpy.
"""

from __future__ import annotations

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
