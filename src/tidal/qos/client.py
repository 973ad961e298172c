"""Client of the agent's HTTP API (``tidal qos status | dry-run | events``).

Errors the agent answers come back as the same :mod:`tidal.errors` class with its message
(:func:`tidal.service.wire.raise_for_error`); an agent that does not answer is a
:class:`~tidal.errors.QosError` saying how to start one.
"""

from __future__ import annotations

from typing import Any

import httpx

from tidal.errors import QosError
from tidal.service.client import plain_http_transport
from tidal.service.wire import raise_for_error

API_TIMEOUT_S = 10.0


class QosClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = API_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport or plain_http_transport(),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> QosClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise QosError(
                f"QoS agent API at {self.base_url} is not reachable ({exc}); "
                "is `tidal qos agent` running?"
            ) from None
        raise_for_error(resp, fallback=QosError, what=f"the QoS agent API at {self.base_url}")
        try:
            return resp.json()
        except ValueError:
            raise QosError(
                f"the QoS agent API at {self.base_url} answered {path} with invalid JSON"
            ) from None

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("GET", "/v1/status")
        return doc

    def dry_run(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("POST", "/v1/dry-run")
        return doc

    def events(self) -> list[dict[str, Any]]:
        doc: list[dict[str, Any]] = self.call("GET", "/v1/events")
        return doc

    def report_latency(self, app: str, p95_ms: float) -> None:
        self.call("POST", "/v1/signals/latency", {"app": app, "p95_ms": p95_ms})
