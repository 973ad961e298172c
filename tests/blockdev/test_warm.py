"""Pushing a trace into the FUSE disk's page cache: the runs, the push, the warmer."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from tidal.blockdev.warm import TraceWarmer, runs
from tidal.errors import FuseServerError
from tidal.image.trace import Trace, TraceRange

from .test_fuse_ll import served
from .test_serve import MemoryDevice

PAGE = mmap.PAGESIZE


def trace_of(*byte_ranges: tuple[int, int]) -> Trace:
    return Trace(tuple(TraceRange(off // 512, n // 512) for off, n in byte_ranges))


def test_runs_are_whole_pages_in_trace_order_merged_when_they_follow() -> None:
    t = trace_of((5 * 512, 1024), (2 * PAGE, PAGE), (100 * PAGE, 512), (3 * PAGE, 2 * PAGE))
    assert runs(t, 1 << 20) == [  # the last follows page 2, but not the range just before it
        range(0, PAGE),
        range(2 * PAGE, 3 * PAGE),
        range(100 * PAGE, 101 * PAGE),
        range(3 * PAGE, 5 * PAGE),
    ]
    # a range that starts where the run before it ends joins it, up to the size cap
    follow = trace_of((0, PAGE), (PAGE, PAGE), (2 * PAGE, PAGE))
    assert runs(follow, 1 << 20) == [range(0, 3 * PAGE)]
    assert runs(follow, 1 << 20, max_run_bytes=2 * PAGE) == [
        range(0, 2 * PAGE),
        range(2 * PAGE, 3 * PAGE),
    ]
    # clamped to the disk; a range wholly past its end is left out
    assert runs(trace_of((PAGE, 4 * PAGE), (8 * PAGE, PAGE)), 3 * PAGE) == [range(PAGE, 3 * PAGE)]


@pytest.mark.root
@pytest.mark.fuse
def test_pushed_bytes_are_read_from_the_page_cache_without_a_request(tmp_path: Path) -> None:
    dev = MemoryDevice(1 << 20, readonly=True)
    dev.data[:] = random.Random(3).randbytes(1 << 20)
    with served(dev, tmp_path / "mnt") as disk:
        fd = os.open(disk.disk_path, os.O_RDONLY)  # the kernel has the inode from here on
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around our reads
            marked = b"P" * (4 * PAGE)  # not the device's bytes: only the page cache has them
            disk.push(8 * PAGE, marked)
            reads = disk.counters.reads
            assert os.pread(fd, 4 * PAGE, 8 * PAGE) == marked
            assert disk.counters.reads == reads, "a pushed page needed a FUSE read"
            assert os.pread(fd, PAGE, 40 * PAGE) == bytes(dev.data[40 * PAGE : 41 * PAGE])
            assert disk.counters.reads > reads, "an unpushed page must be read from the server"
            with pytest.raises(FuseServerError, match="outside the disk"):
                disk.push((1 << 20) - PAGE, bytes(2 * PAGE))
        finally:
            os.close(fd)
    with pytest.raises(FuseServerError, match="closed"):
        disk.push(0, bytes(PAGE))


@pytest.mark.root
@pytest.mark.fuse
def test_a_writable_disk_is_never_pushed_to(tmp_path: Path) -> None:
    with served(MemoryDevice(1 << 20), tmp_path / "mnt") as disk:
        with pytest.raises(FuseServerError, match="writable"):
            disk.push(0, bytes(PAGE))
        with pytest.raises(FuseServerError, match="read-only"):
            TraceWarmer(disk, trace_of((0, PAGE)))


@pytest.mark.root
@pytest.mark.fuse
def test_the_warmer_pushes_the_trace_once_the_disk_is_open(tmp_path: Path) -> None:
    size = 4 << 20
    dev = MemoryDevice(size, readonly=True)
    dev.data[:] = random.Random(5).randbytes(size)
    trace = trace_of(
        (PAGE, 3 * PAGE), (4 * PAGE, 2 * PAGE), (700 * PAGE, 100 * PAGE), (2 << 20, 512)
    )
    with served(dev, tmp_path / "mnt") as disk:
        warmer = TraceWarmer(disk, trace).start()
        assert not warmer.wait(0.3), "it pushes nothing before the disk is opened"
        assert warmer.stats.pushed_runs == 0
        fd = os.open(disk.disk_path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            assert warmer.wait(10)
            s = warmer.stats
            assert s.done and s.errors == 0 and s.pushed_runs == s.runs == 3
            assert s.pushed_bytes == 5 * PAGE + 100 * PAGE + PAGE
            reads = disk.counters.reads
            for tr in trace.ranges:
                got = os.pread(fd, tr.length_bytes, tr.offset_bytes)
                assert got == bytes(dev.data[tr.offset_bytes : tr.offset_bytes + tr.length_bytes])
            assert disk.counters.reads == reads, "the trace's pages were all in the page cache"
        finally:
            os.close(fd)


@pytest.mark.root
@pytest.mark.fuse
def test_a_cancelled_warmer_stops_and_a_failing_read_is_counted(tmp_path: Path) -> None:
    dev = MemoryDevice(1 << 20, readonly=True)
    dev.fail_at = 2 * PAGE
    with served(dev, tmp_path / "mnt") as disk:
        never = TraceWarmer(disk, trace_of((0, PAGE))).start()
        never.cancel()
        assert never.wait(5) and never.stats.pushed_runs == 0
        fd = os.open(disk.disk_path, os.O_RDONLY)
        try:
            warmer = TraceWarmer(disk, trace_of((2 * PAGE, PAGE), (9 * PAGE, PAGE))).start()
            assert warmer.wait(10)
            assert warmer.stats.errors == 1 and warmer.stats.pushed_runs == 1
        finally:
            os.close(fd)
