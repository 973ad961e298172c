"""End to end through the real kernel: convert OCI images, mount them, compare with the source.

The source trees are made with ordinary file operations; layer 1 is packed by GNU tar (an
independent tool), later layers by ``tarfile`` with whiteouts and an opaque directory. The
expected final tree is the source tree changed the same way with ordinary file operations.
The exported raw disk is checked with ``e2fsck -fn`` and ``debugfs`` (e2fsprogs).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tidal.blockdev import mounts
from tidal.blockdev.builder import build_from_dir, commit_writable, convert_oci
from tidal.blockdev.rawdisk import export_raw
from tidal.errors import UnsafeArchiveError
from tidal.image.manifest import Image
from tidal.testing.oci_builder import LayerTar, sha, tar_directory, write_oci_layout
from tidal.testing.trees import diff_trees

from .conftest import leaked

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop]


def _make_base(root: Path) -> None:
    rng = random.Random(7)
    root.mkdir()
    os.chmod(root, 0o755)
    for d in ("etc", "bin", "home/user", "big", "dev", "run", "gonedir/a/b", "opq", "empty"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "shadow").write_text("root:*:19000::::::\n")
    os.chown(root / "etc" / "shadow", 0, 42)
    os.chmod(root / "etc" / "shadow", 0o640)
    (root / "bin" / "tool").write_bytes(rng.randbytes(200_000))
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-link")
    os.symlink("tool", root / "bin" / "sh")
    os.symlink("/etc/hosts", root / "abs-link")
    (root / "home" / "user" / ".profile").write_text("export A=1\n")
    for p in (root / "home" / "user", root / "home" / "user" / ".profile"):
        os.chown(p, 1000, 1000)
    os.chmod(root / "home" / "user", 0o700)
    (root / "big" / "data.bin").write_bytes(rng.randbytes(3 << 20))
    x = root / "xattr-file"
    x.write_text("colourful")
    os.setxattr(x, "user.color", b"blue")
    os.setxattr(x, "trusted.tidal", b"\x00\x01binary")
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop9", 0o660 | 0o060000, os.makedev(7, 9))
    os.mkfifo(root / "run" / "fifo", 0o600)
    (root / "gone").write_text("to be whited out")
    (root / "gonedir" / "a" / "b" / "deep").write_text("deep")
    (root / "opq" / "old1").write_text("1")
    (root / "opq" / "old2").write_text("2")
    os.chmod(root / "empty", 0o1777)


def _gnu_tar(src: Path) -> bytes:
    return subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-C",
            str(src),
            "-cf",
            "-",
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout


@dataclass(frozen=True)
class Source:
    oci_dir: Path
    expected: Path
    info: dict


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A three-layer OCI layout and the tree it must produce."""
    base = tmp_path_factory.mktemp("src")
    tree = base / "tree"
    _make_base(tree)
    layer1 = _gnu_tar(tree)

    # layer 2: whiteouts, an opaque dir, a changed file, a new file with a hard link
    shutil.rmtree(tree / "gonedir")
    (tree / "gone").unlink()
    for p in (tree / "opq").iterdir():
        p.unlink()
    (tree / "opq" / "new").write_text("fresh")
    (tree / "etc" / "hosts").write_text("10.0.0.1 tidal\n")
    (tree / "new").mkdir()
    (tree / "new" / "file").write_text("linked twice")
    os.link(tree / "new" / "file", tree / "new" / "file-link")
    t2 = LayerTar()
    t2.whiteout("gone")
    t2.whiteout("gonedir")
    for rel in ("etc", "etc/hosts", "opq"):
        t2.add_path(tree, rel)
    t2.opaque("opq")
    for rel in ("opq/new", "new", "new/file", "new/file-link"):
        t2.add_path(tree, rel)

    # layer 3 (stored uncompressed): shrink a big file, drop a symlink, replace a file by a dir
    (tree / "big" / "data.bin").write_bytes(b"small now")
    (tree / "abs-link").unlink()
    (tree / "xattr-file").unlink()
    (tree / "xattr-file").mkdir()
    os.setxattr(tree / "xattr-file", "user.kind", b"dir")
    t3 = LayerTar()
    t3.whiteout("abs-link")
    for rel in ("big/data.bin", "xattr-file"):
        t3.add_path(tree, rel)

    oci = base / "oci"
    info = write_oci_layout(oci, [layer1, t2.bytes(), t3.bytes()], compress=[True, True, False])
    return Source(oci, tree, info)


@pytest.fixture(scope="module")
def converted(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("conv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_DATA_ROOT", str(work / "data"))
        res = convert_oci(source.oci_dir, work / "image")
    assert not leaked(work)
    yield res.image_dir


def test_converted_image_mounts_as_the_source_tree(
    source: Source, converted: Path, tmp_path: Path
) -> None:
    m = Image.open(converted).manifest
    assert [r.source_digest for r in m.layers] == [d["digest"] for d in source.info["layers"]]
    assert [r.source_diff_id for r in m.layers] == source.info["diff_ids"]
    assert m.config == source.info["config"]["config"]
    info = mounts.mount_image(converted, tmp_path / "mnt")
    try:
        assert info.readonly and mounts.list_mounts() == [info]
        assert diff_trees(source.expected, tmp_path / "mnt") == []
        with pytest.raises(OSError):
            (tmp_path / "mnt" / "new-file").write_text("read-only")
    finally:
        mounts.unmount(tmp_path / "mnt")
    assert mounts.list_mounts() == [] and not leaked(tmp_path)


def test_exported_raw_disk_passes_e2fsck_and_debugfs_sees_the_files(
    source: Source, converted: Path, tmp_path: Path
) -> None:
    raw = tmp_path / "disk.raw"
    res = export_raw(converted, raw)
    st = raw.stat()
    assert st.st_size == res.size_bytes == Image.open(converted).manifest.size_bytes
    assert st.st_blocks * 512 < st.st_size // 2, "export must be sparse"
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /etc/hosts", str(raw)], capture_output=True, check=True
    )
    assert cat.stdout == (source.expected / "etc" / "hosts").read_bytes()
    stat_out = subprocess.run(
        ["debugfs", "-R", "stat /etc/shadow", str(raw)], capture_output=True, text=True, check=True
    ).stdout
    assert "Mode:  0640" in stat_out and "Group:    42" in stat_out
    ls = subprocess.run(
        ["debugfs", "-R", "ls -l /opq", str(raw)], capture_output=True, text=True, check=True
    ).stdout
    assert "new" in ls and "old1" not in ls


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_archives_convert_to_the_same_tree(fmt: str, source: Source, tmp_path: Path) -> None:
    archive = tmp_path / f"image.{fmt}.tar"
    if fmt == "oci-archive":
        tar_directory(source.oci_dir, archive)
    else:
        if not shutil.which("skopeo"):
            pytest.skip("needs skopeo")
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                f"oci:{source.oci_dir}:latest",
                f"docker-archive:{archive}:tidal/test:latest",
            ],
            check=True,
            capture_output=True,
        )
    res = convert_oci(archive, tmp_path / "image")
    assert len(res.manifest.layers) == 3
    assert [r.source_diff_id for r in res.manifest.layers] == source.info["diff_ids"]
    mounts.mount_image(res.image_dir, tmp_path / "mnt")
    try:
        assert diff_trees(source.expected, tmp_path / "mnt") == []
    finally:
        mounts.unmount(tmp_path / "mnt")


def test_build_from_dir_copies_everything(source: Source, tmp_path: Path) -> None:
    res = build_from_dir(source.expected, tmp_path / "image")
    assert len(res.manifest.layers) == 1
    mounts.mount_image(res.image_dir, tmp_path / "mnt")
    try:
        assert diff_trees(source.expected, tmp_path / "mnt") == []
    finally:
        mounts.unmount(tmp_path / "mnt")


def test_rw_mount_then_commit_makes_a_new_layer(converted: Path, tmp_path: Path) -> None:
    mnt, wdir = tmp_path / "mnt", tmp_path / "writable"
    info = mounts.mount_image(converted, mnt, writable_dir=wdir)
    try:
        assert not info.readonly
        (mnt / "etc" / "added").write_text("written through FUSE")
        (mnt / "etc" / "shadow").unlink()
        with pytest.raises(mounts.MountError, match="already in use"):
            mounts.mount_image(converted, tmp_path / "other", writable_dir=wdir)
    finally:
        mounts.unmount(mnt)
    before = Image.open(converted).manifest
    assert wdir.is_dir() and (wdir / "index").stat().st_size > 0, "the server flushed its layer"
    rec = commit_writable(converted, wdir, tmp_path / "next")
    after = Image.open(tmp_path / "next").manifest
    assert after.layers == (*before.layers, rec)
    assert Image.open(converted).manifest == before, "the source image is untouched"
    mounts.mount_image(tmp_path / "next", mnt)
    try:
        assert (mnt / "etc" / "added").read_text() == "written through FUSE"
        assert not (mnt / "etc" / "shadow").exists()
    finally:
        mounts.unmount(mnt)


@pytest.mark.parametrize("rw", [False, True], ids=["ro", "rw"])
def test_unmount_after_kill_9_of_the_server_leaves_nothing_behind(
    converted: Path, tmp_path: Path, rw: bool
) -> None:
    mnt = tmp_path / "mnt"
    info = mounts.mount_image(converted, mnt, writable_dir=tmp_path / "w" if rw else None)
    assert (mnt / "etc" / "hosts").exists()
    os.kill(info.server_pid, signal.SIGKILL)
    time.sleep(0.2)
    assert not mounts.server_alive(info)
    with pytest.raises(OSError):
        (mnt / "bin" / "tool").read_bytes()  # blocks not yet cached: the device is gone
    if rw:  # recovery: mounting again over the dead mount tears it down first
        again = mounts.mount_image(converted, mnt, writable_dir=tmp_path / "w")
        assert (mnt / "bin" / "tool").stat().st_size == 200_000
        assert mounts.list_mounts() == [again]
    mounts.unmount(mnt)
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert info.disk_file not in losetup
    proc_mounts = Path("/proc/mounts").read_text()
    assert str(mnt) not in proc_mounts and info.fuse_dir not in proc_mounts
    assert mounts.list_mounts() == []


def test_unmount_of_a_busy_mount_needs_force(converted: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mounts.mount_image(converted, mnt)
    fh = (mnt / "etc" / "hosts").open()
    try:
        with pytest.raises(mounts.MountError, match=r"busy.*--force"):
            mounts.unmount(mnt)
        assert len(mounts.list_mounts()) == 1
    finally:
        fh.close()
    mounts.unmount(mnt)


def test_path_escaping_layer_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    t1 = LayerTar()
    t1.add_raw("link", kind=tarfile.SYMTYPE, linkname=str(outside))
    t2 = LayerTar()
    t2.add_raw("link/evil", data=b"escaped")
    write_oci_layout(tmp_path / "oci", [t1.bytes(), t2.bytes()])
    with pytest.raises(UnsafeArchiveError, match=r"layer 1 .*'link/evil'.*not a directory"):
        convert_oci(tmp_path / "oci", tmp_path / "image")
    assert os.listdir(outside) == []
    assert not (tmp_path / "image").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".image")] == []

    t3 = LayerTar()
    t3.add_raw("../../etc/evil", data=b"x")
    write_oci_layout(tmp_path / "oci2", [t3.bytes()])
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.' component"):
        convert_oci(tmp_path / "oci2", tmp_path / "image")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def test_cli_inspect_verify_and_corruption(converted: Path, tmp_path: Path) -> None:
    copy = tmp_path / "image"
    shutil.copytree(converted, copy)
    res = _cli("inspect", str(copy), "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["layers"]) == 3
    ok = _cli("verify", str(copy))
    assert ok.returncode == 0 and "ok: 3 layer(s)" in ok.stdout, ok.stderr
    layer = Image.open(copy).manifest.layers[0]
    blob = copy / "blobs" / "sha256" / layer.digest[7:]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # inside chunk 0's stored bytes
    blob.write_bytes(bytes(data))
    bad = _cli("verify", str(copy))
    assert bad.returncode == 1
    assert "layer 0" in bad.stderr and "chunk 0" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_mount_umount_and_errors(converted: Path, tmp_path: Path) -> None:
    env = {"TIDAL_DATA_ROOT": os.environ["TIDAL_DATA_ROOT"]}
    mnt = tmp_path / "mnt"
    res = _cli("mount", str(converted), str(mnt), env=env)
    assert res.returncode == 0, res.stderr
    assert (mnt / "etc" / "hosts").read_text() == "10.0.0.1 tidal\n"
    # the server outlives the CLI process that started it
    assert mounts.server_alive(mounts.list_mounts()[0])
    res = _cli("umount", str(mnt), env=env)
    assert res.returncode == 0, res.stderr
    res = _cli("umount", str(mnt), env=env)
    assert res.returncode == 1 and "no Tidal image is mounted" in res.stderr
    res = _cli("convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"), env=env)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_layers_are_gzip_sized_sanity(source: Source) -> None:
    """The fixture's first layer is gzip: a sanity check that the test exercises decompression."""
    blob = source.oci_dir / "blobs" / "sha256" / source.info["layers"][0]["digest"][7:]
    assert (
        gzip.decompress(blob.read_bytes())[:512]
        and sha(blob.read_bytes()) == source.info["layers"][0]["digest"]
    )


def test_cleanup_stale_tears_down_dead_mounts_and_orphan_loops(
    converted: Path, tmp_path: Path
) -> None:
    alive = mounts.mount_image(converted, tmp_path / "alive")
    dead = mounts.mount_image(converted, tmp_path / "dead")
    os.kill(dead.server_pid, signal.SIGKILL)
    # an orphan: a loop device on a file under the mounts directory that no record owns
    orphan_file = mounts.state_dir() / "orphan" / "disk"
    orphan_file.parent.mkdir(parents=True)
    orphan_file.write_bytes(bytes(1 << 20))
    orphan = subprocess.run(
        ["losetup", "--find", "--show", str(orphan_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    time.sleep(0.2)
    cleaned = mounts.cleanup_stale()
    assert sorted(cleaned) == sorted([dead.target, orphan])
    assert mounts.list_mounts() == [alive]
    assert (tmp_path / "alive" / "etc" / "hosts").exists()
    mounts.unmount(tmp_path / "alive")


def test_cli_build_and_export_raw(source: Source, tmp_path: Path) -> None:
    env = {"TIDAL_DATA_ROOT": os.environ["TIDAL_DATA_ROOT"], "COLUMNS": "40"}
    res = _cli(
        "build", str(source.expected / "etc"), "-o", str(tmp_path / "img"), "--size", "80M", env=env
    )
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "img").manifest.size_bytes == 80 << 20
    res = _cli("inspect", str(tmp_path / "img"), "--json", env=env)
    assert json.loads(res.stdout)["size_bytes"] == 80 << 20, "JSON must survive a narrow terminal"
    res = _cli("export-raw", str(tmp_path / "img"), str(tmp_path / "disk.raw"), env=env)
    assert res.returncode == 0, res.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /hosts", str(tmp_path / "disk.raw")], capture_output=True, check=True
    )
    assert cat.stdout == (source.expected / "etc" / "hosts").read_bytes()
    res = _cli("build", str(tmp_path / "missing"), "-o", str(tmp_path / "x"), env=env)
    assert (
        res.returncode == 1 and "is not a directory" in res.stderr and "Traceback" not in res.stderr
    )


def test_failed_mount_leaves_no_state(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.mkdir()
    (img / "manifest.json").write_text(
        json.dumps(
            {
                "format": "tidal.image.v1",
                "size_bytes": 1 << 20,
                "layers": [
                    {
                        "digest": "sha256:" + "0" * 64,
                        "size_bytes": 10,
                        "raw_data_bytes": 0,
                        "extent_count": 0,
                        "codec": "lz4",
                        "chunk_size_bytes": 65536,
                        "tail_crc32": 0,
                    }
                ],
            }
        )
    )
    with pytest.raises(mounts.FuseServerError, match="does not exist"):
        mounts.mount_image(img, tmp_path / "mnt")
    assert mounts.list_mounts() == []
    assert not mounts.state_dir().exists() or list(mounts.state_dir().iterdir()) == []


def test_corrupt_chunk_reads_as_eio_and_the_server_log_names_range_and_cause(
    converted: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "image"
    shutil.copytree(converted, copy)
    rec = Image.open(copy).manifest.layers[0]
    blob = copy / "blobs" / "sha256" / rec.digest[7:]
    data = bytearray(blob.read_bytes())
    for pos in range(64, len(data) // 2, 4096):  # damage many chunks of the bottom layer
        data[pos] ^= 0x55
    blob.write_bytes(bytes(data))
    info = mounts.mount_image(copy, tmp_path / "mnt")
    failures: list[OSError] = []
    try:
        for dirpath, _dirs, files in os.walk(tmp_path / "mnt", onerror=failures.append):
            for name in files:
                p = Path(dirpath) / name
                try:
                    if p.is_file() and not p.is_symlink():
                        p.read_bytes()
                except OSError as exc:
                    failures.append(exc)
        log_text = info.log_file.read_text()
    finally:
        mounts.unmount(tmp_path / "mnt", force=True)
    assert failures, "damaged chunks must fail reads"
    assert {exc.errno for exc in failures} == {5}, "EIO, never wrong bytes"
    assert "answering EIO" in log_text and "checksum" in log_text
    assert "of bytes [" in log_text


def test_any_source_image_converts_e_g_one_streamed_from_elsewhere(tmp_path: Path) -> None:
    """A SourceImage whose layer opens a non-seekable stream (as a registry download would)."""
    from tidal.blockdev.builder import convert_source_image
    from tidal.blockdev.oci_archive import SourceImage, SourceLayer

    t = LayerTar()
    t.add_raw("hello", data=b"streamed")
    raw = gzip.compress(t.bytes())

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self._buf = io.BytesIO(raw)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            data = self._buf.read(min(len(b), 1000))
            b[: len(data)] = data
            return len(data)

    layer = SourceLayer(
        sha(raw), None, len(raw), "application/vnd.oci.image.layer.v1.tar+gzip", Stream
    )
    res = convert_source_image(
        SourceImage("stream", {"config": {"Cmd": ["x"]}}, (layer,)), tmp_path / "img"
    )
    assert res.manifest.config == {"Cmd": ["x"]}
    mounts.mount_image(res.image_dir, tmp_path / "mnt")
    try:
        assert (tmp_path / "mnt" / "hello").read_bytes() == b"streamed"
    finally:
        mounts.unmount(tmp_path / "mnt")
