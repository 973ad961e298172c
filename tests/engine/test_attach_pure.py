"""The attach protocol's framing and socket paths (pure and loopback: no root)."""

from __future__ import annotations

import os
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
