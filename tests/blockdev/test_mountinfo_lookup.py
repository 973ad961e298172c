"""``is_mountpoint`` searches the mount table for the escaped path before parsing: it must
answer exactly as the full parse (``str(path) in mount_points()``) does, escapes included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.blockdev.ext4 import (
    _escape,
    is_mountpoint,
    mount_points,
    mount_points_under,
    mount_root,
    mounted_among,
    unescape,
)
from tidal.proc import run

TABLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:35 / /var/tmp/a\\040b rw - tmpfs tmpfs rw\n"
    "41 22 0:36 /var/tmp/src /var/tmp/bind rw - ext4 /dev/sda1 rw\n"
    "42 22 0:37 / /var/tmp/x\\134y\\011z rw - overlay overlay rw,lowerdir=/l\n"
    "43 22 0:38 / /var/tmp/short rw - tmpfs tmpfs rw\n"
)


def test_lookup_answers_as_the_full_parse(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(TABLE)
    table = mount_points(info)
    for p in ("/", "/var/tmp/a b", "/var/tmp/bind", "/var/tmp/x\\y\tz", "/var/tmp/short"):
        assert is_mountpoint(Path(p), info) and p in table
    # the bind's source root (field 4) is not a mount point; nor a prefix of one, nor a longer path
    for p in ("/var/tmp/src", "/var/tmp/a", "/var/tmp/sho", "/var/tmp/short/x", "/var/tmp/a\\040b"):
        assert not is_mountpoint(Path(p), info) and p not in table


@given(st.text(alphabet=st.sampled_from("ab \\\t\n/0"), min_size=1, max_size=12))
def test_escape_is_the_inverse_of_unescape(name: str) -> None:
    assert unescape(_escape(name)) == name
    assert not any(c in _escape(name) for c in " \t\n")


def test_mount_points_under_answers_as_filtering_the_full_parse(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(TABLE)
    table = mount_points(info)
    for d in ("/var/tmp", "/var/tmp/", "/var/tmp/a b", "/var/tmp/sh", "/", "/var/tmp/x\\y\tz"):
        base = d.rstrip("/") or "/"
        want = sorted(m for m in table if m == base or m.startswith(base.rstrip("/") + "/"))
        assert sorted(mount_points_under(Path(d), info)) == want, d
    assert mount_points_under(Path("/var/tmp/sh"), info) == []  # /var/tmp/short is not below


@pytest.mark.root
def test_statx_answers_as_the_table_on_this_kernel(tmp_path: Path) -> None:
    """``mount_root`` (statx's STATX_ATTR_MOUNT_ROOT) says what the table says, for a bind
    mount on the same filesystem too (where comparing st_dev would say no), and this kernel
    answers it (no fallback to the table on the engine's path)."""
    tmpfs, bind, plain = tmp_path / "tmpfs", tmp_path / "bind", tmp_path / "plain"
    for d in (tmpfs, bind, plain):
        d.mkdir()
    run(["mount", "-t", "tmpfs", "tidal-test", str(tmpfs)], what="mount tmpfs")
    try:
        run(["mount", "--bind", str(bind), str(bind)], what="bind mount")
        try:
            assert os.stat(bind).st_dev == os.stat(tmp_path).st_dev  # st_dev cannot tell
            for p in (tmpfs, bind, Path("/"), Path("/proc")):
                assert mount_root(p) is True, p
                assert is_mountpoint(p) and str(p) in mount_points()
            for p in (plain, tmp_path / "missing", tmp_path / "tmpfs" / "x"):
                assert mount_root(p) is False, p
                assert not is_mountpoint(p) and str(p) not in mount_points()
            assert mounted_among([str(tmpfs), str(bind), str(plain)]) == {str(tmpfs), str(bind)}
        finally:
            run(["umount", str(bind)], what="umount bind")
    finally:
        run(["umount", str(tmpfs)], what="umount tmpfs")
    assert mount_root(tmpfs) is False and mount_root(bind) is False
