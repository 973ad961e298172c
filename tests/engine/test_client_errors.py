"""The engine client when the daemon dies mid-request: one DaemonUnavailableError line."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.errors import DaemonUnavailableError


def _close(conn: socket.socket) -> None:
    conn.close()


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _half_answer(conn: socket.socket) -> None:
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[{"id": ')
    conn.close()


@pytest.fixture(params=[_close, _reset, _half_answer], ids=["closed", "reset", "cut-off"])
def dying_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A unix socket whose server reads the request, then dies in one of three ways."""
    how: Callable[[socket.socket], None] = request.param
    path = tmp_path / "engine.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(65536)  # the request
            how(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        srv.close()
        t.join(timeout=5)


def test_daemon_dying_mid_request_is_one_line(dying_daemon: Path) -> None:
    client = EngineClient(dying_daemon)
    client._probed = True  # straight to the request: the death is mid-request, not at connect
    try:
        with pytest.raises(DaemonUnavailableError) as info:
            client.list_all()
    finally:
        client.close()
    message = str(info.value)
    assert "not reachable" in message and "\n" not in message, message
