"""The attach protocol's framing and socket paths (pure and loopback: no root)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
import tty
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.engine import attach

frames = st.lists(st.tuples(st.sampled_from(attach.KINDS), st.binary(max_size=300)), max_size=20)


@given(frames, st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_frames_survive_any_split(items: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(attach.frame(k, p) for k, p in items)
    reader, got, pos, i = attach.FrameReader(), [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += reader.feed(stream[pos : pos + step])
        pos, i = pos + step, i + 1
    assert got == items


def test_bad_frames_and_resize() -> None:
    with pytest.raises(attach.FrameError, match="unknown frame kind"):
        attach.FrameReader().feed(b"z\0\0\0\0")
    with pytest.raises(attach.FrameError, match="over the"):
        attach.FrameReader().feed(attach.HEADER.pack(b"o", attach.MAX_FRAME_BYTES + 1))
    ((kind, payload),) = attach.FrameReader().feed(attach.resize_frame(40, 120))
    assert kind == attach.RESIZE and attach.parse_resize(payload) == (40, 120)
    with pytest.raises(attach.FrameError):
        attach.parse_resize(b"\0")


def test_socket_below_a_path_too_long_for_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90) / ("e" * 40)
    deep.mkdir(parents=True)
    path = str(deep / attach.ATTACH_SOCKET)
    assert len(path) > attach.UNIX_PATH_MAX
    with attach.listen(path) as server:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with attach.connect(path) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    with pytest.raises(OSError):
        attach.connect(str(deep / "nothing.sock")).close()


def _frames_until_exit(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    reader, got = attach.FrameReader(), []
    while not got or got[-1][0] != attach.EXITED:
        data = sock.recv(65536)
        if not data:
            break
        got += reader.feed(data)
    return got


def test_server_relays_a_pty_with_replay_resize_and_exit(tmp_path: Path) -> None:
    """The monitor's server over a real pty pair (no container, no root)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    log = tmp_path / "container.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    server = attach.AttachServer(str(tmp_path / "attach.sock"), master_fd=master, log_fd=log_fd)
    try:
        os.write(slave, b"prompt> ")  # before any client: replayed to the first one
        time.sleep(0.2)
        with attach.connect(str(tmp_path / "attach.sock")) as sock:
            sock.sendall(attach.frame(attach.STDIN, b"keys") + attach.resize_frame(30, 90))
            assert os.read(slave, 4) == b"keys"
            deadline = time.monotonic() + 5
            while _size(slave) != (30, 90):
                assert time.monotonic() < deadline, _size(slave)
                time.sleep(0.02)
            os.write(slave, b"bye")
            os.close(slave)  # the container's side is gone: EIO on the master ends the pump
            server.finish(0)
            frames = _frames_until_exit(sock)
    finally:
        server.finish(None)
        os.close(log_fd)
    output = b"".join(p for k, p in frames if k == attach.OUTPUT)
    assert output == b"prompt> bye" and frames[-1] == (attach.EXITED, b"0")
    assert log.read_bytes() == b"prompt> bye"
    assert not (tmp_path / "attach.sock").exists()


def test_a_client_that_reads_nothing_does_not_stall_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attach, "CLIENT_SEND_TIMEOUT_S", 0.3)
    master, slave = os.openpty()
    tty.setraw(slave)
    log = tmp_path / "container.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    server = attach.AttachServer(str(tmp_path / "a.sock"), master_fd=master, log_fd=log_fd)
    try:
        with attach.connect(str(tmp_path / "a.sock")) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            time.sleep(0.1)
            payload = b"x" * (4 << 20)
            view, t0 = memoryview(payload), time.monotonic()
            os.set_blocking(slave, False)  # a stalled relay fails the test, not hangs it
            while view:  # the container writing: it must not block on the stuck client
                assert time.monotonic() - t0 < 20, f"{len(view)} bytes never written"
                try:
                    view = view[os.write(slave, view[:65536]) :]
                except BlockingIOError:
                    time.sleep(0.01)
            deadline = time.monotonic() + 30
            while log.stat().st_size < len(payload):
                assert time.monotonic() < deadline, log.stat().st_size
                time.sleep(0.05)
        os.close(slave)
    finally:
        server.finish(None)
        os.close(log_fd)


def _size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols
