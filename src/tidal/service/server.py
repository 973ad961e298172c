"""The service kit's server: a route table over ``http.server``, on TCP or a unix socket.

A :class:`Service` is what a Tidal daemon serves: its routes (method, path pattern ->
handler), its health checks and its Prometheus registry. Every service answers

- its routes, with JSON bodies (a handler returns a JSON-able value or a :class:`Response`);
- ``GET /healthz``: ``{"status": "ok"}``, or ``{"status": "failing", "problems": [...]}``
  with a 503 when one of ``health_checks`` names a problem;
- ``GET /metrics``: the service's own registry (one per instance, so tests run several),
  which also counts requests and their latency by route;
- errors as :mod:`tidal.service.wire` says: one status table, one body shape.

:class:`TcpServiceServer` and :class:`UnixServiceServer` serve a service; ``serve_forever()``
blocks (a CLI), ``start()`` serves from a thread (tests, a FUSE server's P2P peer) and
``stop()`` ends either.

Why ``http.server`` and not Starlette + uvicorn (``benchmarks/bench_http.py``, README
"Services"): a P2P peer server starts inside every lazy mount's FUSE server process, whose
start-up is on the mount path. Importing and starting uvicorn + Starlette there took 153-171 ms
against this module's 85 ms (asyncio, an event loop thread), and per request on a keep-alive
connection they were slower too (p50 0.9-1.1 ms against 0.7 ms, p99 4.5-5 ms against 1.6 ms);
the handlers are blocking calls (runc, cgroupfs, chunk reads) that Starlette would run in its
thread pool, its slowest mode. What is hand-written here is routing and the request/response
plumbing (about 300 lines of code); parsing HTTP stays the standard library's, exposition
``prometheus_client``'s, loaded at the first request or scrape rather than at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tidal.errors import AuthenticationError, ConfigError, NotFoundError, TidalError
from tidal.service.auth import PROOF_HEADER
from tidal.service.wire import (
    HEALTH_FAILING_STATUS,
    INTERNAL_ERROR_STATUS,
    error_body,
    status_for,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from tidal.service.auth import ClusterToken

log = logging.getLogger("tidal.service")

JSON = "application/json"
OPEN_ROUTES = frozenset({"healthz", "metrics", "metrics_cadvisor", "metrics_resource"})
"""Answered without credentials even when a service has ``auth`` (probes and scrapers)."""
HealthCheck = Callable[[], str | None]
"""Returns ``None`` when fine, else one line naming the problem."""
ErrorFields = Callable[[BaseException, str], Mapping[str, Any]]
"""Protocol fields a service adds beside ``error`` in an error body (the extender's ``Error``)."""

_PARAM_RE = re.compile(r"\{(\w+)(:path)?\}")
REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0)


def _compile(pattern: str) -> re.Pattern[str]:
    """``/v1/containers/{ref}/logs`` -> a regex: ``{name}`` is one path segment,
    ``{name:path}`` any rest (slashes included, possibly empty)."""
    out, pos = [], 0
    for m in _PARAM_RE.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.*)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Request:
    """One request as a handler sees it (body already read)."""

    method: str
    path: str
    params: Mapping[str, str]
    """Path parameters of the matched pattern, URL-decoded."""
    query: Mapping[str, str]
    """Query parameters; the last value wins."""
    headers: Message
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON (``None`` when empty); bad JSON is a :class:`ConfigError` (400)."""
        if not self.body:
            return None
        try:
            return _json_loads(self.body)
        except ValueError as exc:
            raise ConfigError(f"request body is not JSON: {exc}") from None

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object (``{}`` when empty)."""
        data = self.json()
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"request body must be a JSON object, not {type(data).__name__}")
        return data


@dataclass(frozen=True)
class Response:
    """What a handler answers when plain JSON with status 200 is not enough."""

    body: bytes = b""
    status: int = 200
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        return cls(_json_dumps(payload), status, JSON, headers or {})


def _json_dumps(payload: Any) -> bytes:
    return json.dumps(payload, default=str).encode()


def _json_loads(raw: bytes) -> Any:
    return json.loads(raw)


@dataclass(frozen=True)
class Route:
    """``method`` + ``pattern`` -> ``handler(request)``; ``name`` labels its metrics."""

    method: str
    pattern: str
    handler: Callable[[Request], Any]
    name: str = ""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", _compile(self.pattern))
        if not self.name:
            object.__setattr__(self, "name", self.pattern)


class Service:
    """Routes, health checks and metrics of one service instance; transport-free (testable
    with :meth:`handle` alone)."""

    def __init__(
        self,
        name: str,
        routes: Iterable[Route],
        *,
        error: type[TidalError] = TidalError,
        health_checks: Iterable[HealthCheck] = (),
        registry: CollectorRegistry | None = None,
        error_fields: ErrorFields | None = None,
        auth: ClusterToken | None = None,
    ) -> None:
        """``auth``: every route but ``/healthz`` and ``/metrics`` needs a request signed with
        this cluster token, and every answer to a signed request carries its proof
        (:mod:`tidal.service.auth`)."""
        self.name = name
        self.error = error
        self.auth = auth
        self.routes: list[Route] = [
            *routes,
            Route("GET", "/healthz", lambda _: self.health(), "healthz"),
            Route("GET", "/metrics", lambda _: self.metrics(), "metrics"),
        ]
        self.health_checks: list[HealthCheck] = list(health_checks)
        """Checks ``/healthz`` runs; a part may append its own (the scheduler's controller loop can)."""
        self.error_fields = error_fields
        self._registry = registry
        self._collectors: list[Any] = []
        self._metrics_lock = threading.Lock()
        self._requests: Counter | None = None
        self._seconds: Histogram | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The service's own registry, made (and prometheus-client imported) on first use:
        a P2P peer inside a FUSE server process does not load it before the mount is ready."""
        with self._metrics_lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                self._registry = CollectorRegistry()
            for collector in self._collectors:
                self._registry.register(collector)
            self._collectors.clear()
            return self._registry

    def add_collector(self, collector: Any) -> None:
        """Register a prometheus-client collector (an object with ``collect()``) now if the
        registry exists, else when it is made."""
        with self._metrics_lock:
            if self._registry is None:
                self._collectors.append(collector)
                return
        self.registry.register(collector)

    def _observe(self, route: str, status: int, seconds: float) -> None:
        if self._requests is None or self._seconds is None:
            from prometheus_client import Counter, Histogram

            registry = self.registry
            with self._metrics_lock:
                if self._requests is None or self._seconds is None:
                    self._requests = Counter(
                        "tidal_http_requests",
                        "Requests answered, by route and status",
                        ["service", "route", "status"],
                        registry=registry,
                    )
                    self._seconds = Histogram(
                        "tidal_http_request_seconds",
                        "Time to answer a request, by route",
                        ["service", "route"],
                        buckets=REQUEST_SECONDS_BUCKETS,
                        registry=registry,
                    )
        self._requests.labels(self.name, route, str(status)).inc()
        self._seconds.labels(self.name, route).observe(seconds)

    # --- built-in routes -------------------------------------------------------------------

    def health(self) -> Response:
        problems = []
        for check in self.health_checks:
            try:
                problem = check()
            except Exception as exc:  # a broken check is a failing check, not a 500
                problem = f"health check {getattr(check, '__name__', check)!s} failed: {exc}"
            if problem:
                problems.append(problem)
        if problems:
            return Response.json({"status": "failing", "problems": problems}, HEALTH_FAILING_STATUS)
        return Response.json({"status": "ok"})

    def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), 200, CONTENT_TYPE_LATEST)

    # --- dispatch --------------------------------------------------------------------------

    def error_response(self, exc: BaseException) -> Response:
        """The one error shape for ``exc`` (and the service's protocol fields, if any)."""
        if isinstance(exc, TidalError):
            status, type_name, message = status_for(exc), type(exc).__name__, str(exc)
        else:
            status, type_name = INTERNAL_ERROR_STATUS, self.error.__name__
            message = f"internal error in {self.name}: {exc!r}"
        body = error_body(exc, type_name)
        body["error"]["message"] = message
        if self.error_fields is not None:
            body.update(self.error_fields(exc, message))
        return Response.json(body, status)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        head_as_get = None
        for route in self.routes:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}
            if method == "HEAD" and route.method == "GET" and head_as_get is None:
                head_as_get = route, {k: unquote(v) for k, v in m.groupdict().items()}
            allowed.append(route.method)
        if head_as_get is not None:  # HEAD is GET without the body (the handler skips it)
            return head_as_get
        only = f" ({', '.join(sorted(set(allowed)))} only)" if allowed else ""
        raise NotFoundError(f"{self.name} has no route {method} {path}{only}")

    def handle(self, method: str, target: str, headers: Message, body: bytes = b"") -> Response:
        """Answer one request; never raises (errors become error responses)."""
        t0 = time.perf_counter()
        url = urlsplit(target)
        route_name = "unmatched"
        nonce = None
        try:
            route, params = self._match(method, url.path)
            route_name = route.name
            if self.auth is not None and route.name not in OPEN_ROUTES:
                nonce = self.auth.check_request(method, url.path, dict(headers.items()))
            request = Request(method, url.path, params, dict(parse_qsl(url.query)), headers, body)
            result = route.handler(request)
            response = result if isinstance(result, Response) else Response.json(result)
        except Exception as exc:
            if not isinstance(exc, TidalError):
                log.exception("%s: unhandled error in %s %s", self.name, method, url.path)
            elif isinstance(exc, AuthenticationError):
                log.warning("%s: refused %s %s: %s", self.name, method, url.path, exc)
            response = self.error_response(exc)
        if nonce is not None and self.auth is not None:
            proof = {PROOF_HEADER: self.auth.proof(nonce, response.status)}
            response = dataclasses.replace(response, headers={**response.headers, **proof})
        self._observe(route_name, response.status, time.perf_counter() - t0)
        return response


# --- transports ------------------------------------------------------------------------------


class _KitHandler(BaseHTTPRequestHandler):
    """Reads one request, hands it to the server's :class:`Service`, writes the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client holds one connection
    wbufsize = 1 << 16
    """Buffered: headers and a small body leave in one write (``handle_one_request`` flushes).
    Two small writes meet Nagle and the client's delayed ACK: 40 ms per keep-alive request."""
    server: TcpServiceServer | UnixServiceServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.server.service.name, *args)

    def address_string(self) -> str:
        addr = self.client_address
        return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        resp = self.server.service.handle(self.command, self.path, self.headers, body)
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            headers = dict(resp.headers)
            length_header = headers.pop("Content-Length", None)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", length_header or str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
            self.wfile.flush()  # here, so a client that left is caught below
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up; nothing to tell it

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


class _TcpKitHandler(_KitHandler):
    disable_nagle_algorithm = True  # TCP_NODELAY: answers go out at once


LISTEN_BACKLOG = 128
"""Connections waiting to be accepted (socketserver's default is 5). A unix socket refuses
the sixth at once with EAGAIN instead of letting it wait, so a few busy clients of a loaded
daemon (a burst of instance starts) met "Resource temporarily unavailable"."""


class _Serving:
    """``start()`` in a daemon thread, ``stop()`` (also when never started).

    ``stop()`` also ends the connections clients keep alive: a stopped server must not go on
    answering on them from their handler threads (a P2P child would never notice its parent
    left, and the threads would outlive the server).
    """

    service: Service
    request_queue_size = LISTEN_BACKLOG
    _thread: threading.Thread | None = None
    _conns: set[socket.socket]
    _conns_lock: threading.Lock

    def _init_connections(self) -> None:
        self._conns = set()
        self._conns_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().finish_request(request, client_address)  # type: ignore[misc]
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a handler (the client reset it): a log line, not
        socketserver's traceback on stderr."""
        log.debug("%s: connection from %s failed", self.service.name, client_address, exc_info=True)

    def server_close(self) -> None:
        """Close the listening socket and every connection still open (socketserver's
        ``server_close`` leaves those to their threads)."""
        super().server_close()  # type: ignore[misc]
        self._close_connections()

    def _close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def start(self) -> Any:
        self._thread = threading.Thread(
            target=self.serve_forever,  # type: ignore[attr-defined]
            kwargs={"poll_interval": 0.2},
            name=self.service.name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.shutdown()  # type: ignore[attr-defined]  # waits for serve_forever
            self._thread.join(timeout=5)
        self._thread = None
        self.server_close()


def _bind_error(error: type[TidalError], what: str, where: str, exc: BaseException) -> TidalError:
    why = getattr(exc, "strerror", None) or exc
    return error(f"{what} cannot listen on {where}: {why}")


class TcpServiceServer(_Serving, ThreadingHTTPServer):  # type: ignore[misc]
    """A service on ``host:port`` (port 0: any free one; see :attr:`url`)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, service: Service) -> None:
        self.service = service
        self._init_connections()
        try:
            super().__init__((host, port), _TcpKitHandler)
        except (OSError, OverflowError) as exc:
            raise _bind_error(service.error, service.name, f"{host}:{port}", exc) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def port(self) -> int:
        return int(self.server_address[1])


class UnixServiceServer(_Serving, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):  # type: ignore[misc]
    """A service on a unix socket at ``path`` (the caller removes a stale socket file first:
    only it knows whether another server still owns it)."""

    daemon_threads = True

    def __init__(self, path: str, service: Service) -> None:
        self.service = service
        self._init_connections()
        self.path = path
        try:
            super().__init__(path, _KitHandler)
        except OSError as exc:
            raise _bind_error(service.error, service.name, path, exc) from None

    @property
    def url(self) -> str:
        return f"unix:{self.path}"


def counter_families(
    labels: Mapping[str, str], rows: Iterable[tuple[str, str, float]]
) -> Iterator[Any]:
    """One Prometheus counter family per ``(name, doc, value)``, each with ``labels``: what a
    custom collector yields for counters it reads from elsewhere (the FUSE and chunk counters).
    prometheus-client is imported here, at the first scrape, not with the caller."""
    from prometheus_client.core import CounterMetricFamily

    names, values = list(labels), list(labels.values())
    for name, doc, value in rows:
        family = CounterMetricFamily(name, doc, labels=names)
        family.add_metric(values, value)
        yield family


# --- metrics over TCP for services on a unix socket ------------------------------------------

METRICS_HOST = "127.0.0.1"
"""Where ``--metrics-listen PORT`` binds when given without a host: loopback, so a scrape
endpoint is never exposed to the network unless asked for."""


def parse_listen(value: str, what: str = "--metrics-listen") -> tuple[str, int]:
    """``PORT``, ``:PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; loopback when
    no host is given. Bad input is a :class:`ConfigError` naming it."""
    raw = value.strip()
    host, sep, port_s = raw.rpartition(":")
    if not sep:
        host, port_s = "", raw
    host = host.removeprefix("[").removesuffix("]") or METRICS_HOST
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(
            f"{what} {value!r}: give HOST:PORT or PORT with a port from 1 to 65535 "
            f"(without a host it listens on {METRICS_HOST})"
        )
    return host, int(port_s)


def metrics_service(service: Service) -> Service:
    """What a TCP metrics listener serves for ``service``: only its ``GET /healthz`` and its
    ``GET /metrics...`` routes (the cAdvisor ones too), answered by ``service`` itself. The
    rest of its API stays on its unix socket, whose file mode is its access control."""
    routes = [
        r
        for r in service.routes
        if r.method == "GET" and (r.pattern == "/healthz" or r.pattern.startswith("/metrics"))
    ]
    return Service(f"{service.name} metrics", routes, error=service.error)


class MetricsListener(TcpServiceServer):
    """``--metrics-listen``: a service's metrics on TCP, for a scraper that cannot reach its
    unix socket (Prometheus). Served from a thread until :meth:`stop`."""

    def __init__(self, listen: str, service: Service) -> None:
        host, port = parse_listen(listen)
        super().__init__(host, port, metrics_service(service))
