"""HTTP API of the agent on the service kit: status, profiles, adjustments, rules, events,
dry-run, latency ingest, ``/healthz`` and Prometheus ``/metrics``.

    GET  /v1/status        GET /v1/profiles      GET /v1/adjustments
    GET  /v1/rules         GET /v1/events        GET /metrics    GET /healthz
    POST /v1/dry-run       POST /v1/signals/latency  {"app": "web", "p95_ms": 120}

The API knows the agent only as a :class:`StatusProvider` (the agent imports this module,
not the other way round). Errors answer in the kit's one shape and status table
(:mod:`tidal.service.wire`).
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from tidal.errors import ConfigError, QosError
from tidal.service.server import Request, Route, Service, TcpServiceServer


class StatusProvider(Protocol):
    """The narrow face of the agent that its API serves."""

    def status(self) -> dict[str, Any]: ...

    def profiles(self) -> dict[str, Any]: ...

    def adjustments(self) -> dict[str, Any]: ...

    def rules_doc(self) -> dict[str, Any]: ...

    def events(self) -> list[dict[str, Any]]: ...

    def dry_run_doc(self) -> dict[str, Any]: ...

    def report_latency(self, app: str, p95_ms: float) -> None: ...

    def health_problem(self) -> str | None:
        """``None`` while the agent's loop runs its rounds, else what is wrong."""
        ...


def _latency(provider: StatusProvider, req: Request) -> dict[str, bool]:
    body = req.json()
    if not isinstance(body, dict) or "app" not in body or "p95_ms" not in body:
        raise ConfigError('latency report must be {"app": NAME, "p95_ms": NUMBER}')
    try:
        p95_ms = float(body["p95_ms"])
    except (TypeError, ValueError):
        raise ConfigError(
            f"latency report: p95_ms must be a number, got {body['p95_ms']!r}"
        ) from None
    try:
        provider.report_latency(str(body["app"]), p95_ms)
    except QosError as exc:  # the agent refused the value: the caller's input
        raise ConfigError(str(exc)) from None
    return {"ok": True}


def qos_service(provider: StatusProvider, registry: CollectorRegistry | None = None) -> Service:
    p = provider
    routes = [
        Route("GET", "/v1/status", lambda _: p.status()),
        Route("GET", "/v1/profiles", lambda _: p.profiles()),
        Route("GET", "/v1/adjustments", lambda _: p.adjustments()),
        Route("GET", "/v1/rules", lambda _: p.rules_doc()),
        Route("GET", "/v1/events", lambda _: p.events()),
        Route("POST", "/v1/dry-run", lambda _: p.dry_run_doc()),
        Route("POST", "/v1/signals/latency", lambda req: _latency(p, req)),
    ]
    return Service(
        "the QoS API",
        routes,
        error=QosError,
        health_checks=[p.health_problem],
        registry=registry,
    )


class ApiServer:
    def __init__(
        self,
        provider: StatusProvider,
        host: str,
        port: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service = qos_service(provider, registry)
        self.server = TcpServiceServer(host, port, self.service)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
