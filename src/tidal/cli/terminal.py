"""``tidal run -i``/``-t``: the client end of a container's attach socket.

The protocol is :mod:`tidal.engine.attach`. With ``-t`` this process relays its terminal:
the local terminal in raw mode (keys, Ctrl-C included, go to the container's terminal), the
container's terminal output to stdout, and the window size at start and on every SIGWINCH.
With ``-i`` alone it forwards stdin (EOF included) while the caller follows the output in the
log. Loaded by ``run`` only when asked for, off every other command's start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import threading
import tty
from collections.abc import Iterator
from typing import BinaryIO

from tidal.engine import attach


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal ``fd``, or None when it is not a terminal."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return rows, cols


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal ``fd`` in raw mode for the duration (restored even on errors)."""
    if not os.isatty(fd):
        yield
        return
    old = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def relay_terminal(sock: socket.socket, in_fd: int, out_fd: int, *, forward_input: bool) -> None:
    """Relay until the container exits (its ``x`` frame, or the socket closing).

    A SIGWINCH only writes a byte to a wakeup pipe (``signal.set_wakeup_fd``) that the select
    watches: the handler itself does nothing, so it takes no lock. (A handler setting a
    ``threading.Event`` deadlocked when a second SIGWINCH arrived while the first handler held
    the event's lock: handlers nest, and the kernel sends one per resize besides any kill.)"""
    size_fd = in_fd if os.isatty(in_fd) else out_fd
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_handler = signal.signal(signal.SIGWINCH, lambda *_: None)
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    reader = attach.FrameReader()
    reading_input = forward_input
    try:
        with raw_mode(in_fd) if forward_input else contextlib.nullcontext():
            resized = True  # the size at start
            while True:
                if resized:
                    resized = False
                    size = window_size(size_fd)
                    if size is not None:
                        sock.sendall(attach.resize_frame(*size))
                watch = [sock.fileno(), wake_r] + ([in_fd] if reading_input else [])
                ready, _, _ = select.select(watch, [], [])
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    resized = True
                if in_fd in ready:
                    data = os.read(in_fd, 65536)
                    sock.sendall(
                        attach.frame(attach.STDIN, data) if data else attach.frame(attach.STDIN_EOF)
                    )
                    reading_input = bool(data)
                if sock.fileno() in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    for kind, payload in reader.feed(data):
                        if kind == attach.OUTPUT:
                            _write_all(out_fd, payload)
                        elif kind == attach.EXITED:
                            return
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGWINCH, previous_handler)
        os.close(wake_r)
        os.close(wake_w)


def forward_stdin(sock: socket.socket, stdin: BinaryIO) -> threading.Thread:
    """``-i`` without ``-t``: copy ``stdin`` to the container (EOF closes its stdin)."""

    def pump() -> None:
        try:
            while True:
                data = stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536)
                if not data:
                    sock.sendall(attach.frame(attach.STDIN_EOF))
                    return
                sock.sendall(attach.frame(attach.STDIN, data))
        except OSError:  # the container exited and its monitor closed the socket
            return

    t = threading.Thread(target=pump, name="tidal-stdin", daemon=True)
    t.start()
    return t


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
