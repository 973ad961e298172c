"""The attach protocol: a container's stdin, terminal output and window size over a unix socket.

An interactive container's monitor (``tidal run -i`` / ``-t``) listens on ``attach.sock`` in
the container's directory; ``tidal run`` connects to it once the container runs. Both sides
exchange frames: one kind byte, a 4-byte big-endian length, the payload.

- client -> monitor: ``i`` stdin bytes, ``e`` stdin closed, ``r`` window size (rows, columns
  as two unsigned shorts)
- monitor -> client: ``o`` terminal output (``-t`` only: without a terminal the output goes
  to the log, which the client follows through the daemon), ``x`` the container exited
  (payload: its exit status as text; the daemon's record stays the authority)

A hand-written framing rather than a library: five message kinds over a local stream, and the
monitor imports only the standard library (it sits on the container start path). Only the
standard library is imported here for the same reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import threading
from collections.abc import Iterator

STDIN = b"i"
STDIN_EOF = b"e"
RESIZE = b"r"
OUTPUT = b"o"
EXITED = b"x"
KINDS = (STDIN, STDIN_EOF, RESIZE, OUTPUT, EXITED)
HEADER = struct.Struct(">cI")
MAX_FRAME_BYTES = 1 << 20
"""A frame larger than this is a broken peer, not data (the relays send 64 KiB at most)."""
ATTACH_SOCKET = "attach.sock"
UNIX_PATH_MAX = 107
"""sun_path holds 108 bytes with the terminating NUL."""


class FrameError(ValueError):
    """The peer sent something that is not a frame of this protocol."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack(">HH", rows, cols))


def parse_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != 4:
        raise FrameError(f"a resize frame holds 4 bytes, got {len(payload)}")
    rows, cols = struct.unpack(">HH", payload)
    return rows, cols


class FrameReader:
    """Frames out of a byte stream fed in pieces (pure: no socket here)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if kind not in KINDS:
                raise FrameError(f"unknown frame kind {kind!r}")
            if length > MAX_FRAME_BYTES:
                raise FrameError(f"frame of {length} bytes is over the {MAX_FRAME_BYTES} limit")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out


@contextlib.contextmanager
def short_path(path: str) -> Iterator[str]:
    """``path`` in a form that fits a unix socket address.

    A container's directory below a deep state directory easily passes the 107 bytes of
    ``sun_path``; ``/proc/self/fd/N/NAME`` through an ``O_PATH`` descriptor of the
    directory names the same file in a few bytes (Linux resolves it at bind and connect)."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield path
        return
    parent, name = os.path.split(path)
    fd = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def listen(path: str) -> socket.socket:
    """A listening socket at ``path`` (replacing a stale file), readable by its owner only."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as addr:
            sock.bind(addr)
        os.chmod(path, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as addr:
            sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def receive_fd(listener: socket.socket, timeout_s: float = 10.0) -> int:
    """The one descriptor a peer sends on ``listener`` (runc's ``--console-socket``: the
    pty master of a container with ``process.terminal``)."""
    listener.settimeout(timeout_s)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout_s)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise OSError("the runtime sent no terminal on its console socket")
    return fds[0]


REPLAY_BYTES = 256 * 1024
"""Terminal output kept for a client that attaches late (the prompt a shell printed before
``tidal run`` connected): the last this many bytes."""
CLIENT_SEND_TIMEOUT_S = 5.0
"""A client that takes no output for this long is dropped rather than stall the terminal."""
DRAIN_TIMEOUT_S = 5.0


class AttachServer:
    """The monitor's side of the protocol (threads; standard library only).

    ``master_fd`` (``-t``): the pty master; its output goes to ``log_fd`` and every client,
    client input goes to it. ``stdin_fd`` (``-i`` without ``-t``): the write end of the
    container's stdin pipe, closed when a client sends EOF or leaves (docker's attached
    ``run -i``). The server owns both descriptors."""

    def __init__(
        self,
        path: str,
        *,
        master_fd: int | None = None,
        stdin_fd: int | None = None,
        log_fd: int | None = None,
    ) -> None:
        self.path = path
        self.master_fd = master_fd
        self.stdin_fd = stdin_fd
        self.log_fd = log_fd
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._replay = bytearray()
        self._listener = listen(path)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        if master_fd is not None:
            self._threads.append(threading.Thread(target=self._pump_output, daemon=True))
        for t in self._threads:
            t.start()

    # --- threads -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.settimeout(CLIENT_SEND_TIMEOUT_S)
            with self._lock:
                try:
                    if self._replay:
                        conn.sendall(frame(OUTPUT, bytes(self._replay)))
                except OSError:
                    conn.close()
                    continue
                self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = FrameReader()
        try:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:  # the timeout is for sends (one per socket): keep waiting
                    continue
                except OSError:
                    break
                if not data:
                    break
                for kind, payload in reader.feed(data):
                    self._on_frame(kind, payload)
        except FrameError:
            pass
        finally:
            self._drop(conn)
            self._close_stdin()  # the attached client left: its stdin is done

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if kind == STDIN:
            fd = self.master_fd if self.master_fd is not None else self.stdin_fd
            if fd is not None:
                with contextlib.suppress(OSError):  # the container closed its end
                    _write_all(fd, payload)
        elif kind == STDIN_EOF:
            self._close_stdin()
        elif kind == RESIZE and self.master_fd is not None:
            rows, cols = parse_resize(payload)
            with contextlib.suppress(OSError):
                fcntl.ioctl(
                    self.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0)
                )

    def _pump_output(self) -> None:
        assert self.master_fd is not None
        while True:
            try:
                data = os.read(self.master_fd, 65536)
            except InterruptedError:
                continue
            except OSError:  # EIO: every holder of the terminal's other side is gone
                return
            if not data:
                return
            if self.log_fd is not None:
                with contextlib.suppress(OSError):
                    _write_all(self.log_fd, data)
            with self._lock:
                self._replay += data
                del self._replay[:-REPLAY_BYTES]
                for conn in list(self._clients):
                    try:
                        conn.sendall(frame(OUTPUT, data))
                    except OSError:
                        self._clients.remove(conn)
                        conn.close()

    # --- helpers -------------------------------------------------------------------------

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._clients:
                self._clients.remove(conn)
        conn.close()

    def _close_stdin(self) -> None:
        with self._lock:
            fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            os.close(fd)

    def drain(self) -> None:
        """Wait (a while) for the terminal's last output: read until its other side closed."""
        if len(self._threads) > 1:
            self._threads[1].join(DRAIN_TIMEOUT_S)

    def finish(self, exit_status: int | None) -> None:
        """The container exited: tell the clients, close everything."""
        self.drain()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            clients, self._clients = self._clients, []
        note = frame(EXITED, b"" if exit_status is None else str(exit_status).encode())
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.sendall(note)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._close_stdin()
        if self.master_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
            self.master_fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
