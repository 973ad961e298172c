"""Applying layer tars to a plain directory: whiteouts, opaque dirs, metadata, path safety."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tidal.blockdev.layer_tar import GRAVEYARD, TreeWriter, extract, normalize, scan_layer
from tidal.errors import ArchiveFormatError, UnsafeArchiveError
from tidal.testing.oci_builder import LayerTar


def apply(root: Path, data: bytes) -> TreeWriter:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        scan = scan_layer(tf)
    writer = TreeWriter(root, reserved=scan.top_level)
    try:
        writer.apply_whiteouts(scan)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
            extract(tf, writer)
    finally:
        writer.close()
    return writer


@pytest.mark.parametrize(
    "name,expected", [("./a/b", "a/b"), ("/a//b/", "a/b"), (".", ""), ("a/./b", "a/b")]
)
def test_normalize(name: str, expected: str) -> None:
    assert normalize(name) == expected


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/.."])
def test_normalize_refuses_dotdot(name: str) -> None:
    with pytest.raises(UnsafeArchiveError, match="escape the root"):
        normalize(name, layer="layer 3")


def test_scan_collects_whiteouts_and_opaque_dirs() -> None:
    t = LayerTar()
    t.add_raw("etc/", kind=tarfile.DIRTYPE, mode=0o755)
    t.whiteout("etc/passwd")
    t.opaque("var/cache")
    t.add_raw("etc/hosts", data=b"x" * 5000)
    with tarfile.open(fileobj=io.BytesIO(t.bytes()), mode="r|") as tf:
        scan = scan_layer(tf)
    assert scan.whiteouts == ("etc/passwd",)
    assert scan.opaque_dirs == ("var/cache",)
    assert scan.entries == 2 and scan.content_bytes == 8192


def test_whiteouts_and_opaque_apply_to_lower_entries_only(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("k")
    (tmp_path / "gone").write_text("g")
    (tmp_path / "gonedir" / "sub").mkdir(parents=True)
    (tmp_path / "opq").mkdir()
    (tmp_path / "opq" / "old").write_text("o")
    t = LayerTar()
    t.whiteout("gone")
    t.whiteout("gonedir")
    t.whiteout("never-existed")
    t.add_raw("opq/", kind=tarfile.DIRTYPE, mode=0o750)
    t.opaque("opq")
    t.add_raw("opq/new", data=b"n")
    apply(tmp_path, t.bytes())
    assert sorted(os.listdir(tmp_path)) == ["keep", "opq"]
    assert os.listdir(tmp_path / "opq") == ["new"]
    assert stat.S_IMODE((tmp_path / "opq").stat().st_mode) == 0o750


def test_regular_files_symlinks_hardlinks_modes_and_mtimes(tmp_path: Path) -> None:
    t = LayerTar()
    t.add_raw("bin/", kind=tarfile.DIRTYPE, mode=0o755)
    t.add_raw("bin/tool", data=b"#!/bin/sh\n", mode=0o4755)
    t.add_raw("bin/alias", kind=tarfile.LNKTYPE, linkname="bin/tool")
    t.add_raw("bin/abs", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
    t.add_raw("bin/rel", kind=tarfile.SYMTYPE, linkname="../../../outside")
    w = apply(tmp_path, t.bytes())
    tool = tmp_path / "bin" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert tool.stat().st_ino == (tmp_path / "bin" / "alias").stat().st_ino
    assert os.readlink(tmp_path / "bin" / "abs") == "/etc/passwd"
    assert os.readlink(tmp_path / "bin" / "rel") == "../../../outside"
    assert (tmp_path / "bin").stat().st_mtime == 1_700_000_000
    assert (w.stats.files, w.stats.links, w.stats.symlinks) == (1, 1, 2)


def test_later_entry_replaces_an_existing_one_of_another_type(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "child").write_text("c")
    t = LayerTar()
    t.add_raw("x", kind=tarfile.SYMTYPE, linkname="/nowhere")
    apply(tmp_path, t.bytes())
    assert os.readlink(tmp_path / "x") == "/nowhere"


def test_entry_below_a_symlink_is_rejected_and_nothing_outside_is_written(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(str(outside), root / "link")
    t = LayerTar()
    t.add_raw("link/evil", data=b"pwned")
    with pytest.raises(UnsafeArchiveError, match=r"'link'.*not a directory"):
        apply(root, t.bytes())
    assert os.listdir(outside) == []


def test_hardlink_to_outside_the_root_is_rejected(tmp_path: Path) -> None:
    t = LayerTar()
    t.add_raw("shadow", kind=tarfile.LNKTYPE, linkname="../../etc/shadow")
    with pytest.raises(UnsafeArchiveError, match="escape the root"):
        apply(tmp_path, t.bytes())


@pytest.mark.root
def test_owners_xattrs_and_device_nodes(tmp_path: Path) -> None:
    t = LayerTar()
    ti = tarfile.TarInfo("owned")
    ti.uid, ti.gid, ti.mode, ti.size = 1234, 5678, 0o2750, 2
    ti.pax_headers = {"SCHILY.xattr.user.tidal": "v\udcff1", "SCHILY.xattr.trusted.x": "t"}
    t.tf.addfile(ti, io.BytesIO(b"ok"))
    dev = tarfile.TarInfo("null")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
    t.tf.addfile(dev)
    fifo = tarfile.TarInfo("pipe")
    fifo.type, fifo.mode = tarfile.FIFOTYPE, 0o640
    t.tf.addfile(fifo)
    apply(tmp_path, t.bytes())
    st = (tmp_path / "owned").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o2750)
    assert os.getxattr(tmp_path / "owned", "user.tidal") == b"v\xff1"
    assert os.getxattr(tmp_path / "owned", "trusted.x") == b"t"
    nst = (tmp_path / "null").lstat()
    assert stat.S_ISCHR(nst.st_mode) and nst.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(nst.st_mode) == 0o666
    assert stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode)


def test_removed_entries_wait_in_a_graveyard_that_finish_deletes(tmp_path: Path) -> None:
    """Removals are renames until the layer's end (so ext4 reuses no inode within a layer):
    after it nothing of the graveyard is left, and a hard link keeps a whited-out file."""
    (tmp_path / "a").write_text("shared")
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f").write_text("f")
    (tmp_path / "old").write_text("replaced by a directory")
    t = LayerTar()
    t.whiteout("a")
    t.opaque("d")
    t.add_raw("old/", kind=tarfile.DIRTYPE, mode=0o755)
    t.add_raw("new", data=b"n")
    writer = apply(tmp_path, t.bytes())
    assert sorted(os.listdir(tmp_path)) == ["b", "d", "new", "old"]
    assert os.listdir(tmp_path / "d") == [] and (tmp_path / "old").is_dir()
    assert (tmp_path / "b").read_text() == "shared" and os.stat(tmp_path / "b").st_nlink == 1
    assert writer.stats.removed == 2  # a, d/sub (the replaced "old" is not a deletion)


def test_the_graveyard_takes_a_name_neither_the_root_nor_the_layer_has(tmp_path: Path) -> None:
    (tmp_path / GRAVEYARD).mkdir()
    (tmp_path / GRAVEYARD / "lower").write_text("l")
    (tmp_path / "gone").write_text("g")
    t = LayerTar()
    t.whiteout("gone")
    t.add_raw(f"{GRAVEYARD}-1/mine", data=b"m")
    apply(tmp_path, t.bytes())
    assert sorted(os.listdir(tmp_path)) == [GRAVEYARD, f"{GRAVEYARD}-1"]
    assert os.listdir(tmp_path / GRAVEYARD) == ["lower"]
    assert (tmp_path / f"{GRAVEYARD}-1" / "mine").read_text() == "m"


def test_an_entry_in_the_graveyard_of_a_writer_not_told_the_layers_names(tmp_path: Path) -> None:
    (tmp_path / "gone").write_text("g")
    t = LayerTar()
    t.whiteout("gone")
    t.add_raw(f"{GRAVEYARD}/x", data=b"x")
    data = t.bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        scan = scan_layer(tf)
    with TreeWriter(tmp_path) as writer:
        writer.apply_whiteouts(scan)
        with (
            tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf,
            pytest.raises(ArchiveFormatError, match="keeps removed entries under"),
        ):
            extract(tf, writer)
