"""The per-mount FUSE server (``python -m tidal.blockdev.serve``) and what FuseDisk does with a
device beyond reads and writes (fsync, fallocate), against an in-memory device and real FUSE."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tidal.blockdev import ext4
from tidal.blockdev.fuse_ll import FuseDisk, zero_range
from tidal.blockdev.mounts import _fuse_unmount, _start_server, _stop_server
from tidal.blockdev.settings import BlockdevSettings
from tidal.errors import ChecksumError, FuseServerError, LayerError
from tidal.image.manifest import Image, ImageWriter


class MemoryDevice:
    """A bytearray disk; ``fail_at`` makes reads touching that offset fail like a bad chunk."""

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        self.data = bytearray(size)
        self.readonly = readonly
        self.fail_at: int | None = None
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise ChecksumError("chunk 7 of layer sha256:ab12 failed its checksum")
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        if self.readonly:
            raise LayerError("read-only")
        self.data[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        assert offset % 512 == 0 and length % 512 == 0, "discard must get whole sectors"
        self.discards.append((offset, length))
        self.data[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.parametrize("offset,length", [(0, 4096), (100, 3000), (511, 2), (1000, 5000)])
def test_zero_range_zeroes_exactly_the_range(offset: int, length: int) -> None:
    rng = random.Random(offset)
    dev = MemoryDevice(8192)
    dev.data[:] = rng.randbytes(8192)
    model = bytearray(dev.data)
    model[offset : offset + length] = bytes(length)
    zero_range(dev, offset, length)
    assert dev.data == model


@pytest.mark.root
@pytest.mark.fuse
def test_fsync_flushes_the_device_and_so_does_close(tmp_path: Path) -> None:
    dev = MemoryDevice(1 << 16)
    (tmp_path / "m").mkdir()
    disk = FuseDisk.mount(dev, tmp_path / "m", name="mem")
    try:
        fd = os.open(disk.disk_path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x", 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert dev.flushes >= 1
        before = dev.flushes
    finally:
        disk.close()
    assert dev.flushes > before


@pytest.mark.root
@pytest.mark.fuse
def test_fallocate_punch_hole_goes_to_discard_and_collapse_is_refused(tmp_path: Path) -> None:
    dev = MemoryDevice(8192)
    dev.data[:] = b"\xff" * 8192
    (tmp_path / "m").mkdir()
    disk = FuseDisk.mount(dev, tmp_path / "m", name="mem")
    try:
        punch = subprocess.run(
            ["fallocate", "--punch-hole", "--keep-size", "-o", "1024", "-l", "2048",
             str(disk.disk_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert punch.returncode == 0, punch.stderr
        assert dev.discards == [(1024, 2048)]
        assert dev.data[1024:3072] == bytes(2048) and dev.data[1023] == 0xFF
        assert dev.data[3072] == 0xFF
        collapse = subprocess.run(
            ["fallocate", "--collapse-range", "-o", "0", "-l", "4096", str(disk.disk_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert collapse.returncode != 0  # a disk does not shrink from the middle
        assert dev.data[3072] == 0xFF and len(dev.data) == 8192
    finally:
        disk.close()


@pytest.mark.root
@pytest.mark.fuse
def test_server_serves_the_merged_view_byte_for_byte(tmp_path: Path) -> None:
    img = tmp_path / "img"
    writer = ImageWriter(img, 4 << 20)
    writer.write_manifest()
    with Image.open(img).writable(tmp_path / "w0") as wl:
        payload = random.Random(1).randbytes(300_000)
        wl.write(12_345, payload)
        writer.commit_layer(wl)
    writer.write_manifest()
    expected = Image.open(img).merged_view().read(0, 4 << 20)
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    proc = _start_server(img, fuse_dir, None, tmp_path / "log", BlockdevSettings())
    try:
        disk = fuse_dir / "disk"
        assert disk.stat().st_size == 4 << 20
        with disk.open("rb") as fh:
            assert fh.read() == expected
            fh.seek(12_000)
            assert fh.read(1000) == expected[12_000:13_000]
        with pytest.raises(OSError):
            disk.open("r+b")
    finally:
        _fuse_unmount(fuse_dir, lazy=False)
        _stop_server(proc.pid, timeout_s=10)
    assert not ext4.is_mountpoint(fuse_dir)
    assert proc.returncode == 0


@pytest.mark.root
@pytest.mark.fuse
def test_server_that_cannot_open_the_image_reports_why(tmp_path: Path) -> None:
    (tmp_path / "fuse").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(FuseServerError, match="not a Tidal image"):
        _start_server(
            tmp_path / "img", tmp_path / "fuse", None, tmp_path / "log", BlockdevSettings()
        )
    assert not ext4.is_mountpoint(tmp_path / "fuse")


@pytest.mark.root
@pytest.mark.fuse
def test_sigterm_flushes_the_writable_layer_and_unmounts(tmp_path: Path) -> None:
    img = tmp_path / "img"
    ImageWriter(img, 1 << 20).write_manifest()
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    wdir = tmp_path / "w"
    proc = _start_server(img, fuse_dir, wdir, tmp_path / "log", BlockdevSettings())
    try:
        fd = os.open(fuse_dir / "disk", os.O_RDWR)
        try:
            os.pwrite(fd, b"acknowledged", 4096 + 3)
        finally:
            os.close(fd)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if ext4.is_mountpoint(fuse_dir):
            _fuse_unmount(fuse_dir, lazy=True)
        _stop_server(proc.pid, timeout_s=5)
    assert not ext4.is_mountpoint(fuse_dir), "the server unmounts on SIGTERM"
    with Image.open(img).writable(wdir, create=False) as wl:
        assert wl.read(4096, 20) == b"\0\0\0acknowledged\0\0\0\0\0"
    assert "stopped" in (tmp_path / "log").read_text()


@pytest.mark.root
@pytest.mark.fuse
def test_cleanup_stale_unmounts_an_unrecorded_fuse_server(tmp_path: Path) -> None:
    from tidal.blockdev.mounts import cleanup_stale, state_dir

    img = tmp_path / "img"
    ImageWriter(img, 1 << 20).write_manifest()
    run = state_dir() / "crashed-before-record"
    (run / "fuse").mkdir(parents=True)
    young = state_dir() / "mount-in-progress"
    (young / "fuse").mkdir(parents=True)
    proc = _start_server(img, run / "fuse", None, tmp_path / "log", BlockdevSettings())
    proc2 = _start_server(img, young / "fuse", None, tmp_path / "log2", BlockdevSettings())
    try:
        os.utime(run, (1, 1))  # as if the crash happened long ago
        assert cleanup_stale() == [str(run / "fuse")]
        assert proc.wait(timeout=10) == 0
        assert ext4.is_mountpoint(young / "fuse"), "a fresh unrecorded mount may be in progress"
    finally:
        for d, p in ((run, proc), (young, proc2)):
            if ext4.is_mountpoint(d / "fuse"):
                _fuse_unmount(d / "fuse", lazy=False)
            _stop_server(p.pid, timeout_s=5)
