"""The small HTTP services' common server: bind errors as Tidal errors, an optional thread.

The QoS API, the scheduler extender, the P2P root and peer servers are all a
``ThreadingHTTPServer`` that a CLI runs in the foreground and tests or a mount run in a
thread of their own; this is that once (core: it imports no part of Tidal).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tidal.errors import TidalError


class BodyHandler(BaseHTTPRequestHandler):
    """A request handler that answers with one whole body (sized, typed) or a JSON document."""

    def send_body(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: Any) -> None:
        self.send_body(status, json.dumps(payload, default=str).encode())


class BackgroundHTTPServer(ThreadingHTTPServer):
    """``serve_forever()`` blocks (CLI); ``start()`` serves in a daemon thread, ``stop()`` ends
    either and closes the socket (also when it was never started)."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        handler: type[BaseHTTPRequestHandler],
        *,
        what: str,
        error: type[TidalError],
    ) -> None:
        try:
            super().__init__((host, port), handler)
        except (OSError, OverflowError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise error(f"{what} cannot listen on {host}:{port}: {why}") from None
        self._what = what
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> BackgroundHTTPServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name=self._what, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.shutdown()  # waits for serve_forever: only when it runs
            self._thread.join(timeout=5)
        self._thread = None
        self.server_close()
