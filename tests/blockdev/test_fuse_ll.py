"""Tidal's own FUSE server (fuse_ll): wire structs, then real mounts through the kernel."""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import random
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.blockdev import ext4, fuse_ll, loop
from tidal.blockdev.ext4 import Ext4Format
from tidal.blockdev.fuse_ll import FuseDisk, Negotiated
from tidal.errors import FuseServerError, MountError
from tidal.image.manifest import Image, ImageWriter

from .test_serve import MemoryDevice


def test_wire_structs_have_the_kernel_sizes() -> None:
    # sizes from include/uapi/linux/fuse.h
    assert fuse_ll.IN_HEADER.size == 40 and fuse_ll.OUT_HEADER.size == 16
    assert fuse_ll.INIT_OUT.size == 64
    assert fuse_ll.ATTR.size == 88
    assert fuse_ll.ENTRY_OUT.size + fuse_ll.ATTR.size == 128
    assert fuse_ll.ATTR_OUT.size + fuse_ll.ATTR.size == 104
    assert fuse_ll.STATFS_OUT.size == 80
    assert fuse_ll.READ_IN.size == 40 and fuse_ll.FALLOCATE_IN.size == 32
    assert fuse_ll.OPEN_OUT.size == 16 and fuse_ll.DIRENT.size == 24


def test_negotiation_round_trips_through_meta_and_knows_resend() -> None:
    n = Negotiated(kernel_minor=45, minor=45, flags=fuse_ll.ASYNC_READ, max_write=1 << 20,
                   max_readahead=131072)  # fmt: skip
    assert Negotiated.from_meta({**n.to_meta(), "mountpoint": "/x"}) == n
    assert n.resend
    old = Negotiated(kernel_minor=38, minor=38, flags=0, max_write=1 << 20, max_readahead=0)
    assert not old.resend
    with pytest.raises(FuseServerError, match="incomplete"):
        Negotiated.from_meta({"minor": 45})


def test_resume_without_resend_is_one_clear_error(tmp_path: Path) -> None:
    old = Negotiated(kernel_minor=38, minor=38, flags=0, max_write=1 << 20, max_readahead=0)
    fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(FuseServerError, match=r"FUSE_NOTIFY_RESEND needs 7\.40"):
        FuseDisk.resume(MemoryDevice(4096), fd, tmp_path, name="old", negotiated=old)
    with pytest.raises(OSError):
        os.fstat(fd)  # resume owns the fd, even when it refuses
    fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(FuseServerError, match="no record of what the connection"):
        FuseDisk.resume(MemoryDevice(4096), fd, tmp_path, name="unknown")


def test_missing_dev_fuse_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuse_ll, "DEV_FUSE", str(tmp_path / "fuse"))
    with pytest.raises(FuseServerError, match="is missing: load the fuse module"):
        FuseDisk.mount(MemoryDevice(4096), tmp_path, name="nofuse")


@contextlib.contextmanager
def served(device: MemoryDevice, mnt: Path, **kw: object) -> Iterator[FuseDisk]:
    mnt.mkdir(exist_ok=True)
    disk = FuseDisk.mount(device, mnt, name=mnt.name, **kw)  # type: ignore[arg-type]
    try:
        yield disk
    finally:
        disk.close()
    assert not ext4.is_mountpoint(mnt)
    assert not any(t.name.startswith(f"fuse-{mnt.name}-") for t in threading.enumerate())


@pytest.mark.root
@pytest.mark.fuse
def test_disk_reads_and_writes_the_right_bytes(tmp_path: Path) -> None:
    dev = MemoryDevice(8 << 20)
    dev.data[:] = random.Random(7).randbytes(8 << 20)
    with served(dev, tmp_path / "mnt") as disk:
        path = disk.disk_path
        st = path.stat()
        assert stat.S_ISREG(st.st_mode) and st.st_size == 8 << 20 and st.st_mode & 0o777 == 0o600
        assert os.listdir(tmp_path / "mnt") == ["disk"]
        assert (tmp_path / "mnt" / "other").exists() is False
        assert path.read_bytes() == bytes(dev.data)
        with path.open("r+b") as fh:
            fh.seek(3_000_001)
            fh.write(b"written through FUSE")
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek((8 << 20) - 3)
            assert fh.read(10) == bytes(dev.data[(8 << 20) - 3 :])  # clamped at the end
        assert dev.data[3_000_001:3_000_021] == b"written through FUSE"
        assert dev.flushes >= 1 and disk.counters.writes >= 1 and disk.counters.flushes >= 1
        with pytest.raises(OSError) as exc:
            os.truncate(path, 4096)
        assert exc.value.errno == errno.EPERM, "a disk does not change size"
        vfs = os.statvfs(tmp_path / "mnt")
        assert vfs.f_frsize * vfs.f_blocks == 8 << 20
        buckets, _sum = disk.read_latency.cumulative()
        assert buckets[-1][1] == disk.counters.reads > 0


@pytest.mark.root
@pytest.mark.fuse
def test_read_failure_is_eio_with_the_byte_range_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = MemoryDevice(1 << 20)
    dev.fail_at = 600_000
    with served(dev, tmp_path / "mnt") as disk:
        fd = os.open(disk.disk_path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            with caplog.at_level(logging.ERROR, logger="tidal.blockdev.fuse_ll"):
                with pytest.raises(OSError) as exc:
                    os.preadv(fd, [memoryview(bytearray(4096))], 598_016)
                assert exc.value.errno == errno.EIO
            assert os.preadv(fd, [memoryview(bytearray(4096))], 0) == 4096
        finally:
            os.close(fd)
        assert disk.counters.errors == 1
    assert "read of bytes [598016, 602112) failed, answering EIO: chunk 7" in caplog.text


@pytest.mark.root
@pytest.mark.fuse
def test_readonly_device_refuses_writes(tmp_path: Path) -> None:
    with served(MemoryDevice(1 << 20, readonly=True), tmp_path / "mnt") as disk:
        assert disk.disk_path.stat().st_mode & 0o777 == 0o400
        with pytest.raises(OSError) as exc:
            disk.disk_path.open("r+b")
        assert exc.value.errno == errno.EROFS
        assert disk.disk_path.read_bytes() == bytes(1 << 20)


@pytest.mark.root
@pytest.mark.fuse
def test_a_real_image_is_served_byte_for_byte(tmp_path: Path) -> None:
    img = tmp_path / "img"
    writer = ImageWriter(img, 4 << 20)
    writer.write_manifest()
    with Image.open(img).writable(tmp_path / "w0") as wl:
        wl.write(12_345, random.Random(1).randbytes(300_000))
        writer.commit_layer(wl)
    writer.write_manifest()
    view = Image.open(img).merged_view()
    expected = view.read(0, 4 << 20)
    (tmp_path / "mnt").mkdir()
    disk = FuseDisk.mount(view, tmp_path / "mnt", name="image")
    try:
        assert disk.disk_path.read_bytes() == expected
    finally:
        disk.close()


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.loop
def test_loop_and_ext4_on_a_fuse_disk(tmp_path: Path) -> None:
    dev = MemoryDevice(64 << 20)
    target = tmp_path / "fs"
    target.mkdir()
    payload = random.Random(3).randbytes(5 << 20)
    with served(dev, tmp_path / "mnt") as disk:
        lo = loop.attach(disk.disk_path, readonly=False)
        try:
            ext4.mkfs(lo.device, Ext4Format(), error=FuseServerError)
            ext4.mount(lo.device, target, readonly=False)
            (target / "file.bin").write_bytes(payload)
            ext4.umount(target)
            ext4.mount(lo.device, target, readonly=True)
            assert (target / "file.bin").read_bytes() == payload
            ext4.umount(target)
        finally:
            if ext4.is_mountpoint(target):
                ext4.umount(target, lazy=True)
            loop.detach(lo.device)
        assert disk.counters.bytes_written > len(payload)


@pytest.mark.root
@pytest.mark.fuse
def test_many_disks_in_one_process_at_once(tmp_path: Path) -> None:
    devices = [MemoryDevice(2 << 20) for _ in range(6)]
    for i, d in enumerate(devices):
        d.data[:] = random.Random(i).randbytes(2 << 20)
    disks = []
    try:
        for i, d in enumerate(devices):
            (tmp_path / f"m{i}").mkdir()
            disks.append(FuseDisk.mount(d, tmp_path / f"m{i}", name=f"m{i}", threads=2))
        results: dict[int, bytes] = {}

        def read(i: int) -> None:
            results[i] = disks[i].disk_path.read_bytes()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(disks))]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert all(results[i] == bytes(devices[i].data) for i in range(len(disks)))
        assert len({d.fd for d in disks}) == len(disks)
    finally:
        for disk in disks:
            disk.close()
    assert not any(ext4.is_mountpoint(tmp_path / f"m{i}") for i in range(len(devices)))


@pytest.mark.root
@pytest.mark.fuse
def test_handoff_in_one_process_close_without_unmount_then_resume(tmp_path: Path) -> None:
    """An upgrade's path: the old FuseDisk stops serving but leaves the connection to the
    fd store; a new one resumes it (its negotiation from the store) and serves the same disk."""
    from .fuse_ll_child import holder

    dev = MemoryDevice(4 << 20)
    dev.data[:] = random.Random(9).randbytes(4 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with holder() as store:
        old = FuseDisk.mount(dev, mnt, name="handoff", fdstore=store, threads=3)
        assert store.names() == ["handoff"]
        entry = store.entry("handoff")
        assert entry is not None and len(entry.fds) == 3
        assert Negotiated.from_meta(entry.meta) == old.negotiated
        entry.close()
        old.close(unmount=False)
        assert ext4.is_mountpoint(mnt), "the connection outlives the server that stopped"
        fd = store.get("handoff")
        assert fd is not None
        with pytest.raises(FuseServerError, match=r"holds the connection of .*mnt, not of"):
            FuseDisk.resume(dev, fd, tmp_path, name="handoff", fdstore=store)
        fd = store.get("handoff")
        assert fd is not None
        new = FuseDisk.resume(dev, fd, mnt, name="handoff", fdstore=store, threads=2)
        try:
            assert new.negotiated == old.negotiated
            assert new.disk_path.read_bytes() == bytes(dev.data)
            assert new.counters.reads > 0 and old.counters.reads == 0
        finally:
            new.close()
        assert store.names() == [], "unmounting drops the entry"
    assert not ext4.is_mountpoint(mnt)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.loop
def test_unmount_while_a_loop_device_holds_the_disk_is_refused_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    dev = MemoryDevice(4 << 20)
    dev.data[:5] = b"still"
    with served(dev, tmp_path / "mnt") as disk:
        lo = loop.attach(disk.disk_path, readonly=True)
        try:
            with pytest.raises(MountError, match="detach the loop device on its disk first"):
                disk.close(busy_timeout_s=0.5)
            fd = os.open(lo.device, os.O_RDONLY | os.O_DIRECT)
            try:
                aligned = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
                assert os.preadv(fd, [aligned], 0) == 4096 and bytes(aligned[:5]) == b"still"
            finally:
                os.close(fd)
        finally:
            loop.detach(lo.device)


@pytest.mark.root
@pytest.mark.fuse
def test_close_after_someone_else_unmounted_is_quiet(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = FuseDisk.mount(MemoryDevice(1 << 20), mnt, name="gone")
    fuse_ll.umount(mnt, lazy=True)
    disk.close()
    assert not ext4.is_mountpoint(mnt)
    assert not any(t.name.startswith("fuse-gone-") for t in threading.enumerate())


@pytest.mark.root
@pytest.mark.fuse
def test_resuming_a_connection_that_died_meanwhile_says_so_and_drops_it(tmp_path: Path) -> None:
    from .fuse_ll_child import holder

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with holder() as store:
        old = FuseDisk.mount(MemoryDevice(1 << 20), mnt, name="dead", fdstore=store)
        old.close(unmount=False)
        fuse_ll.umount(mnt)  # nobody uses it: the kernel ends the connection
        fd = store.get("dead")
        assert fd is not None
        with pytest.raises(FuseServerError, match=r"is gone .* fd store entry was dropped"):
            FuseDisk.resume(MemoryDevice(1 << 20), fd, mnt, name="dead", fdstore=store)
        assert store.names() == []
    assert not any(t.name.startswith("fuse-dead-") for t in threading.enumerate())


@pytest.mark.root
@pytest.mark.fuse
def test_random_reads_and_writes_match_a_model(tmp_path: Path) -> None:
    """Unaligned reads and writes of every size, buffered and O_DIRECT, from four threads at
    once on disjoint quarters, against a bytearray model of what the disk must hold."""
    size = 8 << 20
    dev = MemoryDevice(size)
    model = bytearray(size)
    quarter = size // 4
    failures: list[str] = []

    def worker(q: int, disk: Path) -> None:
        rnd = random.Random(q)
        lo, hi = q * quarter, (q + 1) * quarter
        fd = os.open(disk, os.O_RDWR)
        dfd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 20)
        try:
            for step in range(150):
                off = rnd.randrange(lo, hi - 1)
                n = rnd.choice([1, 511, 4096, 70_000, 1 << 20, 3 << 20])
                n = min(n, hi - off)
                if rnd.random() < 0.5:
                    data = rnd.randbytes(n)
                    os.pwrite(fd, data, off)
                    model[off : off + n] = data
                    if rnd.random() < 0.2:
                        os.fsync(fd)
                elif rnd.random() < 0.5:
                    if os.pread(fd, n, off) != model[off : off + n]:
                        failures.append(f"q{q} step {step}: buffered read [{off}, {off + n})")
                else:
                    a = off - off % 4096
                    m = min(1 << 20, hi - a)
                    os.fsync(fd)  # O_DIRECT reads see what the page cache wrote back
                    got = os.preadv(dfd, [memoryview(buf)[:m]], a)
                    if buf[:got] != model[a : a + got] or got != m:
                        failures.append(f"q{q} step {step}: direct read [{a}, {a + m})")
        finally:
            os.close(fd)
            os.close(dfd)
            buf.close()

    with served(dev, tmp_path / "mnt") as disk:
        workers = [threading.Thread(target=worker, args=(q, disk.disk_path)) for q in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not failures, failures[:5]
        assert disk.disk_path.read_bytes() == bytes(model)
    assert bytes(dev.data) == bytes(model)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.loop
def test_discard_through_the_loop_device_zeroes_the_range(tmp_path: Path) -> None:
    dev = MemoryDevice(16 << 20)
    dev.data[:] = b"\xff" * (16 << 20)
    with served(dev, tmp_path / "mnt") as disk:
        lo = loop.attach(disk.disk_path, readonly=False)
        try:
            subprocess.run(
                ["blkdiscard", "-o", str(1 << 20), "-l", str(2 << 20), lo.device],
                check=True,
                capture_output=True,
            )
        finally:
            loop.detach(lo.device)
    assert dev.discards, "the loop driver's DISCARD arrived as FALLOCATE punch-hole"
    assert bytes(dev.data[1 << 20 : 3 << 20]) == bytes(2 << 20)
    assert dev.data[(1 << 20) - 1] == 0xFF and dev.data[3 << 20] == 0xFF
