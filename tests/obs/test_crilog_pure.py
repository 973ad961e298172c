"""The CRI log format, pure: line splitting against a model, timestamps, the file layout."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.engine.crilog import (
    FULL,
    MAX_LINE_BYTES,
    PARTIAL,
    CriLogSpec,
    CriLogWriter,
    LineSplitter,
    open_log,
    remove_logs,
    timestamp,
)

CRI_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([FP]) (.*)$")


def test_a_line_longer_than_the_limit_is_partials_then_one_full() -> None:
    s = LineSplitter()
    line = b"x" * (2 * MAX_LINE_BYTES + 100)
    out = s.feed(line[:5000]) + s.feed(line[5000:] + b"\n")
    assert [t for t, _ in out] == [PARTIAL, PARTIAL, FULL]
    assert [len(p) for _, p in out] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 100]
    assert b"".join(p for _, p in out) == line


def test_exactly_the_limit_is_one_full_line_and_crlf_loses_its_cr() -> None:
    s = LineSplitter(8)
    assert s.feed(b"12345678\nab\r\n") == [(FULL, b"12345678"), (FULL, b"ab")]
    assert s.feed(b"123456789\n") == [(PARTIAL, b"12345678"), (FULL, b"9")]


def test_output_without_a_final_newline_is_a_partial_at_close() -> None:
    s = LineSplitter()
    assert s.feed(b"one\ntwo") == [(FULL, b"one")]
    assert s.close() == [(PARTIAL, b"two")]
    assert s.close() == []


def test_a_limit_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        LineSplitter(0)


@given(
    chunks=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"")), max_size=12),
    limit=st.integers(1, 16),
)
def test_splitting_matches_a_model(chunks: list[bytes], limit: int) -> None:
    """Model: cut the whole stream at newlines; each line in pieces of ``limit`` (all P but
    the last, F); a trailing rest without newline all P."""
    s = LineSplitter(limit)
    got = [p for c in chunks for p in s.feed(c)] + s.close()
    data = b"".join(chunks)
    *lines, rest = data.split(b"\n")
    want: list[tuple[bytes, bytes]] = []
    for line in lines:
        pieces = [line[i : i + limit] for i in range(0, len(line), limit)] or [b""]
        want += [(PARTIAL, p) for p in pieces[:-1]] + [(FULL, pieces[-1])]
    want += [(PARTIAL, rest[i : i + limit]) for i in range(0, len(rest), limit)]
    assert got == want


def test_timestamps_are_go_rfc3339nano_in_utc() -> None:
    assert timestamp(1_700_000_000_123_456_789) == b"2023-11-14T22:13:20.123456789Z"
    assert timestamp(1_700_000_000_120_000_000) == b"2023-11-14T22:13:20.12Z"
    assert timestamp(1_700_000_000_000_000_000) == b"2023-11-14T22:13:20Z"


def test_writer_lines_parse_as_the_kubelet_reads_them(tmp_path: Path) -> None:
    spec = CriLogSpec(str(tmp_path / "pods" / "ns_p_u" / "main"), str(tmp_path / "c"), "p_ns_main")
    fd = open_log(spec, 0, "abc123")
    try:
        out, err = CriLogWriter(fd, "stdout", 4), CriLogWriter(fd, "stderr", 4)
        out.write(b"hello\nhi")
        err.write(b"oops\n")  # exactly the limit: one F
        out.write(b"\n")
        out.close()
        err.close()
    finally:
        os.close(fd)
    link = tmp_path / "c" / "p_ns_main-abc123.log"
    assert link.is_symlink() and os.readlink(link) == spec.log_path(0)
    rows = [CRI_LINE.match(x) for x in link.read_bytes().splitlines()]
    assert all(rows)
    got = [(m[2], m[3], m[4]) for m in rows if m]
    assert got == [
        (b"stdout", b"P", b"hell"),
        (b"stdout", b"F", b"o"),
        (b"stderr", b"F", b"oops"),
        (b"stdout", b"F", b"hi"),
    ]
    for m in rows:
        assert m is not None
        datetime.fromisoformat(m[1].decode().replace("Z", "+00:00")[:26] + "+00:00")
    remove_logs(spec, "abc123")
    assert not link.exists() and not (tmp_path / "pods" / "ns_p_u").exists()


def test_a_restart_gets_its_own_file_and_the_link_follows(tmp_path: Path) -> None:
    spec = CriLogSpec(str(tmp_path / "ns_p_u" / "main"), str(tmp_path / "c"), "p_ns_main")
    for restart in (0, 1):
        os.close(open_log(spec, restart, "id1"))
    assert sorted(os.listdir(spec.directory)) == ["0.log", "1.log"]
    assert os.readlink(tmp_path / "c" / "p_ns_main-id1.log") == spec.log_path(1)
