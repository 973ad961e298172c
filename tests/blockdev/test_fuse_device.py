"""The FUSE adapter against an in-memory device (no FUSE needed), then through real FUSE."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
from pathlib import Path

import mfusepy
import pytest

from tidal.blockdev import ext4
from tidal.blockdev.fuse_device import BlockDeviceFS, zero_range
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


def test_getattr_reports_one_file_of_the_device_size() -> None:
    fs = BlockDeviceFS(MemoryDevice(1 << 20))
    st = fs.getattr("/disk")
    assert stat.S_ISREG(st["st_mode"]) and st["st_size"] == 1 << 20
    assert stat.S_ISDIR(fs.getattr("/")["st_mode"])
    assert fs.readdir("/", 0) == [".", "..", "disk"]
    with pytest.raises(mfusepy.FuseOSError) as exc:
        fs.getattr("/other")
    assert exc.value.errno == errno.ENOENT


def test_read_write_round_trip_and_clamp_at_the_end() -> None:
    dev = MemoryDevice(8192)
    fs = BlockDeviceFS(dev)
    assert fs.write("/disk", b"abc", 8000, 0) == 3
    assert fs.read("/disk", 4096, 7998, 0) == b"\0\0abc" + bytes(8192 - 8003)
    assert fs.read("/disk", 10, 8192, 0) == b""
    assert fs.counters.bytes_written == 3
    assert (fs.counters.reads, fs.counters.bytes_read) == (1, 8192 - 7998)  # EOF read: no I/O
    with pytest.raises(mfusepy.FuseOSError) as exc:
        fs.write("/disk", b"x" * 10, 8190, 0)
    assert exc.value.errno == errno.ENOSPC


def test_readonly_device_refuses_writes_and_write_opens() -> None:
    fs = BlockDeviceFS(MemoryDevice(4096, readonly=True))
    for call in (lambda: fs.write("/disk", b"x", 0, 0), lambda: fs.open("/disk", os.O_RDWR)):
        with pytest.raises(mfusepy.FuseOSError) as exc:
            call()
        assert exc.value.errno == errno.EROFS
    assert fs.open("/disk", os.O_RDONLY) == 0


def test_device_error_becomes_eio_with_a_log_line_naming_range_and_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = MemoryDevice(1 << 16)
    dev.fail_at = 5000
    fs = BlockDeviceFS(dev, name="img")
    with caplog.at_level(logging.ERROR), pytest.raises(mfusepy.FuseOSError) as exc:
        fs.read("/disk", 4096, 4096, 0)
    assert exc.value.errno == errno.EIO
    assert "[4096, 8192)" in caplog.text and "chunk 7" in caplog.text
    assert fs.counters.errors == 1


def test_fsync_flushes_and_destroy_flushes() -> None:
    dev = MemoryDevice(4096)
    fs = BlockDeviceFS(dev)
    fs.fsync("/disk", 0, 0)
    fs.destroy("/")
    assert dev.flushes == 2


@pytest.mark.parametrize("offset,length", [(0, 4096), (100, 3000), (511, 2), (1000, 5000)])
def test_zero_range_zeroes_exactly_the_range(offset: int, length: int) -> None:
    rng = random.Random(offset)
    dev = MemoryDevice(8192)
    dev.data[:] = rng.randbytes(8192)
    model = bytearray(dev.data)
    model[offset : offset + length] = bytes(length)
    zero_range(dev, offset, length)
    assert dev.data == model


def test_fallocate_punch_hole_goes_to_discard() -> None:
    dev = MemoryDevice(8192)
    dev.data[:] = b"\xff" * 8192
    fs = BlockDeviceFS(dev)
    fs.fallocate("/disk", 0x01 | 0x02, 1024, 2048, 0)
    assert dev.discards == [(1024, 2048)]
    assert dev.data[1024:3072] == bytes(2048) and dev.data[1023] == 0xFF
    with pytest.raises(mfusepy.FuseOSError) as exc:
        fs.fallocate("/disk", 0x08, 0, 512, 0)  # COLLAPSE_RANGE makes no sense for a disk
    assert exc.value.errno == errno.EOPNOTSUPP


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
    assert not ext4.is_mountpoint(fuse_dir), "libfuse unmounts on SIGTERM"
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
