"""HTTP API of the agent (stdlib ``http.server`` in a thread): status, profiles, adjustments,
rules, events, dry-run, latency ingest and Prometheus metrics.

    GET  /v1/status        GET /v1/profiles      GET /v1/adjustments
    GET  /v1/rules         GET /v1/events        GET /metrics
    POST /v1/dry-run       POST /v1/signals/latency  {"app": "web", "p95_ms": 120}

HTTP status codes appear only in :data:`ERROR_STATUS`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tidal.errors import NotFoundError, QosError, TidalError
from tidal.httpserve import BackgroundHTTPServer, BodyHandler

if TYPE_CHECKING:
    from tidal.qos.agent import Agent

ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (NotFoundError, 404),
    (QosError, 400),
    (ValueError, 400),
    (TidalError, 500),
]


def _status_for(exc: Exception) -> int:
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class _Handler(BodyHandler):
    agent: Agent
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _route(self, method: str) -> Any:
        a = self.agent
        path = self.path.split("?", 1)[0].rstrip("/")
        if method == "GET":
            if path == "/v1/status":
                return a.status()
            if path == "/v1/profiles":
                now = a.clock()
                out = {}
                for key in a.aggregator.keys():  # noqa: SIM118 (a method, not a dict)
                    p = a.aggregator.profile(key, now)
                    if p:
                        out[key] = p.to_dict()
                return out
            if path == "/v1/adjustments":
                return {
                    "active": a.executor.journal.entries,
                    "history": [x.to_dict() for x in list(a.executor.history)[-200:]],
                }
            if path == "/v1/rules":
                return {
                    "file": str(a.rules.path),
                    "error": a.rules.last_error,
                    "rules": a.rules.current.raw,
                }
            if path == "/v1/events":
                return [e.to_dict() for e in a.center.events]
            if path == "/healthz":
                return {"ok": True}
        if method == "POST":
            if path == "/v1/dry-run":
                return a.dry_run().to_dict()
            if path == "/v1/signals/latency":
                body = self._body()
                if not isinstance(body, dict) or "app" not in body or "p95_ms" not in body:
                    raise QosError('latency report must be {"app": NAME, "p95_ms": NUMBER}')
                a.report_latency(str(body["app"]), float(body["p95_ms"]))
                return {"ok": True}
        raise NotFoundError(f"no API route {method} {path}; see GET /v1/status")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise QosError(f"request body is not JSON: {exc}") from exc

    def _handle(self, method: str) -> None:
        if method == "GET" and self.path.rstrip("/") == "/metrics":
            self.send_body(200, self.agent.metrics.exposition(), "text/plain; version=0.0.4")
            return
        try:
            try:
                self.send_json(200, self._route(method))
            except (TidalError, ValueError) as exc:
                self.send_json(_status_for(exc), {"error": str(exc), "type": type(exc).__name__})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. a latency probe's short timeout); nothing to tell it

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class ApiServer:
    def __init__(self, agent: Agent, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"agent": agent})
        self.server = BackgroundHTTPServer(host, port, handler, what="the QoS API", error=QosError)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
