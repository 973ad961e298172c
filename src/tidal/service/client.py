"""The clients' side of the kit: a transport for Tidal's plain-HTTP services, and the base of
the clients that talk to a daemon over its unix socket.

Every Tidal service speaks plain HTTP, on a unix socket or a node-internal address, never TLS.
httpx's default transport builds a verifying SSL context all the same, which loads the CA
bundle: 30-80 ms per client on this machine, paid by every CLI command that talks to the
engine daemon (more than all of ``tidal ps``'s own imports). These transports skip it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from tidal.errors import DaemonUnavailableError, TidalError
from tidal.service.wire import raise_for_error


def plain_http_transport(uds: str | None = None) -> httpx.HTTPTransport:
    """A transport for ``http://`` URLs only (on the unix socket ``uds`` if given)."""
    return httpx.HTTPTransport(uds=uds, verify=False)


def socket_reachable(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (a stale socket file
    of a killed daemon does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class SocketClient:
    """A client of one daemon's unix-socket API (the engine daemon, the node service).

    Errors come back as ``{"error": {"type", "message"}}`` and are re-raised as the same
    :mod:`tidal.errors` class with the same message (:func:`tidal.service.wire.raise_for_error`);
    an unreachable daemon is a :class:`~tidal.errors.DaemonUnavailableError` that says how to
    start it.
    """

    what = "the daemon"
    start_hint = ""
    fallback: type[TidalError] = TidalError
    timeout_s = 600.0

    def __init__(
        self, socket_path: Path, *, transport: httpx.BaseTransport | None = None, base: str = "/v1"
    ) -> None:
        """``transport``: instead of the unix socket (``httpx.MockTransport`` in tests)."""
        self.socket_path = socket_path
        self._probed = transport is not None  # the socket probe is for the socket only
        self._http = httpx.Client(
            transport=transport or plain_http_transport(uds=str(socket_path)),
            base_url=f"http://tidal{base}",
            timeout=self.timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unavailable(self, why: object) -> DaemonUnavailableError:
        hint = f"; start it with '{self.start_hint}'" if self.start_hint else ""
        return DaemonUnavailableError(
            f"{self.what} is not reachable at {self.socket_path} ({why}){hint}"
        )

    def _probe(self) -> None:
        """Connect once with a plain socket first: httpx leaks the socket of a refused
        unix-domain connect, and a stale socket file after a killed daemon is common."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError as exc:
                raise self._unavailable(exc.strerror or exc) from exc
        self._probed = True

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if not self._probed:
            self._probe()
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise DaemonUnavailableError(
                f"{self.what} at {self.socket_path} did not answer {method} {path} in time "
                f"({exc or type(exc).__name__})"
            ) from exc
        except (httpx.TransportError, FileNotFoundError) as exc:
            # refused, reset or cut off mid-answer (the daemon died during the request)
            raise self._unavailable(exc or type(exc).__name__) from exc
        raise_for_error(resp, fallback=self.fallback, what=self.what)
        return resp
