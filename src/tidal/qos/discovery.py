"""Find Tidal engine containers and their cgroups through the engine daemon's HTTP API.

The agent is a separate program from the engine (it may run on a node without it, and it must
not import it), so it reads ``GET /v1/containers`` on the daemon's unix socket like any other
client: each record carries the container's labels (``tidal run --label``) and its ``cgroup``.
When the daemon cannot be reached, the last good answer stands (the containers keep running
without it) and the error is kept for the API and the log.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tidal.errors import QosError
from tidal.service.client import plain_http_transport
from tidal.service.wire import error_from_response

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 2.0
"""One agent round is one second: a daemon slower than this is treated as unreachable."""


@dataclass(frozen=True)
class EngineContainer:
    id: str
    name: str
    cgroup: str
    """Relative to the cgroup root (no leading slash), as the agent's CgroupFs expects."""
    labels: dict[str, str]


def parse_containers(payload: Any, source: str) -> list[EngineContainer]:
    """Running containers from a ``GET /v1/containers`` answer; malformed entries are an error."""
    if not isinstance(payload, list):
        raise QosError(f"{source}: expected a list of containers, got {type(payload).__name__}")
    out = []
    for i, rec in enumerate(payload):
        try:
            if rec["status"] != "running":
                continue
            labels = {str(k): str(v) for k, v in rec["spec"].get("labels") or ()}
            cgroup = str(rec["cgroup"]).strip("/")
            out.append(EngineContainer(str(rec["id"]), str(rec["name"]), cgroup, labels))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QosError(
                f"{source}: container [{i}] is not an engine record ({exc!r}); "
                "is the daemon a Tidal engine of the same version?"
            ) from None
        if not cgroup or ".." in cgroup.split("/"):
            raise QosError(f"{source}: container {rec['id']} has an unusable cgroup {cgroup!r}")
    return out


class EngineDiscovery:
    """Lists the engine's running containers; keeps the last good list when the daemon is away."""

    def __init__(self, socket_path: Path, *, transport: httpx.BaseTransport | None = None) -> None:
        """``transport``: instead of the unix socket (``httpx.MockTransport`` in tests)."""
        self.socket_path = socket_path
        self.last_error: str | None = None
        self._last: list[EngineContainer] = []
        self._transport = transport
        self._http: httpx.Client | None = None

    def _client(self) -> httpx.Client:
        if self._http is None and self._transport is not None:
            self._http = httpx.Client(
                transport=self._transport, base_url="http://tidal/v1", timeout=REQUEST_TIMEOUT_S
            )
        if self._http is None:
            # Probe first: httpx leaks its socket when a unix-socket connect fails.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(REQUEST_TIMEOUT_S)
                probe.connect(str(self.socket_path))
            self._http = httpx.Client(
                transport=plain_http_transport(uds=str(self.socket_path)),
                base_url="http://tidal/v1",
                timeout=REQUEST_TIMEOUT_S,
            )
        return self._http

    def fetch(self) -> list[EngineContainer]:
        """The running containers now; raises :class:`QosError` naming the socket and cause."""
        where = f"engine daemon at {self.socket_path}"
        try:
            resp = self._client().get("/containers")
            refused = error_from_response(resp, fallback=QosError, what=where)
            if refused is not None:
                raise QosError(f"{where} refused to list containers: {refused}")
            payload = resp.json()
        except (httpx.HTTPError, OSError) as exc:
            self.close()  # reconnect (and probe) next time
            why = getattr(exc, "strerror", None) or exc
            raise QosError(
                f"{where} is not reachable ({why}); is 'tidal daemon' running?"
            ) from None
        except ValueError as exc:
            raise QosError(f"{where} sent invalid JSON: {exc}") from None
        return parse_containers(payload, where)

    def containers(self) -> list[EngineContainer]:
        """Like :meth:`fetch`, but a failure returns the last good list (and is remembered)."""
        try:
            self._last = self.fetch()
        except QosError as exc:
            if self.last_error is None:  # once per outage, not every second
                log.warning("qos: %s; keeping the last %d known containers", exc, len(self._last))
            self.last_error = str(exc)
            return list(self._last)
        if self.last_error is not None:
            log.info("qos: engine daemon at %s is back", self.socket_path)
        self.last_error = None
        return list(self._last)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
