"""The atomic write every part uses for state files."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

from tidal.fsutil import (
    atomic_file,
    copy_sparse,
    read_line,
    write_by_digest,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_json_atomic(target, {"a": 1}, fsync=True)
    assert json.loads(target.read_text()) == {"a": 1}
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):  # fails half-way through writing the temporary
        write_text_atomic(target, "half" * 1000 + "\udc80")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_read_line_returns_the_first_line_or_what_came_before_timeout_or_eof() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"ready 123\nmore")
        assert read_line(r, 1.0) == "ready 123"  # the rest of that read is dropped
        t0 = time.monotonic()
        assert read_line(r, 0.2) == ""  # nothing more: returns at the timeout
        assert 0.15 < time.monotonic() - t0 < 2.0
        os.write(w, b"partial")
        os.close(w)
        w = -1
        assert read_line(r, 1.0) == "partial"  # EOF without a newline
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_read_line_takes_an_fd_numbered_past_1024() -> None:
    """A daemon holding many instances has fds past select()'s 1024 limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    r, w = os.pipe()
    high = os.dup2(r, 1100)
    try:
        os.write(w, b"far\n")
        assert read_line(high, 1.0) == "far"
    finally:
        for fd in (r, w, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_bytes_and_streamed_writes_are_atomic_too(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    write_bytes_atomic(target, b"\x00\x01", fsync=True)
    assert target.read_bytes() == b"\x00\x01"
    with atomic_file(target, binary=True) as fh:
        fh.write(b"new")
        assert target.read_bytes() == b"\x00\x01"  # readers see the old file until the end
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_file(target, binary=True) as fh:
        fh.write(b"torn")
        raise RuntimeError("the writer died half-way")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["disk.raw"]


def test_json_keeps_the_callers_layout(tmp_path: Path) -> None:
    target = tmp_path / "j.json"
    write_json_atomic(target, {"b": 1, "a": 2}, indent=None, sort_keys=True)
    assert target.read_text() == '{"a": 2, "b": 1}\n'


def test_write_by_digest_names_the_file_by_its_content_or_leaves_nothing(tmp_path: Path) -> None:
    from tidal.ids import sha256_digest

    def place(digest: str) -> Path:
        return tmp_path / digest.split(":", 1)[1]

    with write_by_digest(tmp_path, place, mode=0o644) as w:
        w.write(b"hello ")
        w.write(memoryview(b"world"))
    assert w.digest == sha256_digest(b"hello world") and w.size_bytes == 11
    assert place(w.digest).read_bytes() == b"hello world"
    assert place(w.digest).stat().st_mode & 0o777 == 0o644

    def refuse(digest: str) -> None:
        raise ValueError(f"not the digest I wanted: {digest}")

    with (
        pytest.raises(ValueError, match="not the digest"),
        write_by_digest(tmp_path, place, check=refuse) as w,
    ):
        w.write(b"other bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [place(sha256_digest(b"hello world")).name]


def test_copy_sparse_copies_the_data_and_keeps_the_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 64 << 20
    with open(src, "wb") as fh:
        fh.truncate(size)
        for off in (0, 5 << 20, size - 4096):
            fh.seek(off)
            fh.write(bytes([off % 251 + 1]) * 4096)
    copied = copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == size
    assert copied < 1 << 20  # the data extents, not the 64 MiB of holes
    assert dst.stat().st_blocks * 512 < 1 << 20  # and the copy stays sparse
    with pytest.raises(FileExistsError):
        copy_sparse(src, dst)  # never over an existing file
