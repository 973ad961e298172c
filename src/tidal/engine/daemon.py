"""``tidal daemon``: the engine served as a small HTTP/JSON API on a unix socket.

The API is documented in docs/engine-api.md. Requests map one-to-one onto :class:`Engine`
methods; errors map onto HTTP status codes in one table (:data:`STATUS_OF`) and carry the
Tidal error class name so the client re-raises the same type. Containers never depend on the
daemon process: stopping or SIGKILLing it leaves them running under their monitors, and the
next daemon finds them through the state database (:meth:`Daemon.reconcile`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tidal.engine.containers import Engine
from tidal.engine.settings import EngineSettings, load_settings
from tidal.engine.spec import ContainerSpec
from tidal.errors import (
    ConfigError,
    ContainerStateError,
    EngineError,
    NotFoundError,
    RetryableError,
    TidalError,
)

log = logging.getLogger(__name__)
API_VERSION = "v1"
LXCFS_CHECK_INTERVAL_S = 5.0

STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (ContainerStateError, 409),
    (ConfigError, 400),
    (RetryableError, 503),
    (TidalError, 500),
)
"""First match wins: the only place HTTP status codes meet Tidal's error types."""


def status_for(exc: Exception) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    engine: Engine


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return "unix"

    # --- plumbing --------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        if n == 0:
            return {}
        try:
            data = json.loads(self.rfile.read(n))
        except ValueError as exc:
            raise ConfigError(f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("request body must be a JSON object")
        return data

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(payload, bytes):
            body, ctype = payload, "application/octet-stream"
        else:
            body, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts or parts[0] != API_VERSION:
                raise _NoRoute()
            status, payload, headers = route(self.server.engine, method, parts[1:], query, self)
            self._send(status, payload, headers)
        except _NoRoute:
            self._send(
                404, {"error": {"type": "NotFound", "message": f"no route {method} {url.path}"}}
            )
        except TidalError as exc:
            self._send(
                status_for(exc), {"error": {"type": type(exc).__name__, "message": str(exc)}}
            )
        except Exception as exc:  # a bug: keep serving, report it
            log.exception("unhandled error in %s %s", method, url.path)
            self._send(
                500, {"error": {"type": "EngineError", "message": f"internal error: {exc!r}"}}
            )

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _NoRoute(Exception):
    pass


def route(
    engine: Engine, method: str, parts: list[str], query: dict[str, str], req: _Handler
) -> tuple[int, Any, dict[str, str] | None]:
    """The API table: (method, path) -> engine call. Returns status, payload, extra headers."""
    if parts == ["ping"] and method == "GET":
        return 200, {"ok": True, "api": API_VERSION, "pid": os.getpid()}, None
    if not parts or parts[0] != "containers":
        raise _NoRoute()
    if len(parts) == 1:
        if method == "GET":
            return 200, [engine.describe(r) for r in engine.list_all()], None
        if method == "POST":
            body = req._body()
            spec = ContainerSpec.from_json(body.get("spec") or {})
            rec = engine.run(spec) if body.get("start", True) else engine.create(spec)
            return 201, rec.to_json(), None
        raise _NoRoute()
    ref = parts[1]
    action = parts[2] if len(parts) > 2 else None
    if action is None:
        if method == "GET":
            return 200, engine.inspect(ref), None
        if method == "DELETE":
            engine.remove(ref, force=query.get("force") in ("1", "true"))
            return 200, {"removed": ref}, None
        raise _NoRoute()
    if action == "logs" and method == "GET":
        chunk = engine.logs(ref, int(query.get("offset", "0")))
        headers = {
            "X-Tidal-Next-Offset": str(chunk.next_offset),
            "X-Tidal-Running": "1" if chunk.running else "0",
        }
        return 200, chunk.data, headers
    if method != "POST":
        raise _NoRoute()
    body = req._body()
    if action == "start":
        return 200, engine.start(ref).to_json(), None
    if action == "stop":
        return 200, engine.stop(ref, body.get("timeout_s")).to_json(), None
    if action == "kill":
        return 200, engine.kill(ref, str(body.get("signal", "KILL"))).to_json(), None
    if action == "wait":
        return 200, engine.wait(ref, body.get("timeout_s")).to_json(), None
    if action == "exec":
        res = engine.exec(
            ref,
            list(body.get("argv") or []),
            env=list(body.get("env") or []),
            stdin=base64.b64decode(body.get("stdin_b64") or ""),
        )
        return (
            200,
            {
                "exit_code": res.exit_code,
                "stdout_b64": base64.b64encode(res.stdout).decode(),
                "stderr_b64": base64.b64encode(res.stderr).decode(),
            },
            None,
        )
    if action == "update":
        rec = engine.update(
            ref,
            cpus=body.get("cpus"),
            memory_bytes=body.get("memory_bytes"),
            pids_limit=body.get("pids_limit"),
        )
        return 200, rec.to_json(), None
    if action == "upgrade":
        cmd = body.get("command")
        rec = engine.upgrade(ref, str(body["image"]), tuple(cmd) if cmd else None)
        return 200, rec.to_json(), None
    raise _NoRoute()


class Daemon:
    """Owns the engine, the socket, the single-instance lock and the lxcfs watchdog."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or load_settings()
        self.socket_path = self.settings.resolved_socket_path()
        state_dir = self.settings.resolved_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(state_dir / "daemon.lock", "w")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise EngineError(
                f"another tidal daemon already owns {state_dir}; stop it first"
            ) from None
        self.engine = Engine(self.settings)
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    def reconcile(self) -> dict[str, int]:
        """Fold in exits and starts that happened while no daemon ran; count by status."""
        counts = self.engine.reconcile()
        if self.engine.lxcfs.mounted():
            with contextlib.suppress(TidalError):
                self.engine.lxcfs.ensure()
        return counts

    def _bind(self) -> _Server:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # The lock says no daemon runs, so a socket file is stale.
            path.unlink()
        server = _Server(str(path), _Handler)
        server.engine = self.engine
        os.chmod(path, 0o660)
        return server

    def _watch_lxcfs(self) -> None:
        while not self._stop.wait(LXCFS_CHECK_INTERVAL_S):
            if self.engine.lxcfs.mounted() or self.engine.lxcfs.pid():
                try:
                    self.engine.lxcfs.ensure()
                except TidalError as exc:
                    log.error("lxcfs watchdog: %s", exc)

    def start(self) -> None:
        """Reconcile, bind and serve in background threads (tests); see :meth:`serve_forever`."""
        counts = self.reconcile()
        log.info("engine state: %s", counts or "no containers")
        self._server = self._bind()
        t = threading.Thread(target=self._server.serve_forever, name="tidal-api", daemon=True)
        t.start()
        w = threading.Thread(target=self._watch_lxcfs, name="tidal-lxcfs-watch", daemon=True)
        w.start()
        self._threads = [t, w]

    def serve_forever(self) -> None:
        self.start()
        try:
            self._stop.wait()
        finally:
            self.close()

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop serving. Containers keep running; lxcfs keeps serving them."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._threads:
            t.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.engine.close()
        self._lock_fh.close()


def socket_reachable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
