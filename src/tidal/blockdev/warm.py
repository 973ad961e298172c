"""Pushing an image's trace into the kernel's page cache of its FUSE disk.

Every read the loop device sends to the FUSE disk is a round trip through the server's Python
(1-2 ms in the node service while a trace replay runs), and an application's start-up reads
one block after another: bench_peers' imports app made ~1,970 such reads at 1 Gbit/s. On a
read-only lazy mount whose image carries a trace, the server reads the trace's ranges itself,
in trace order, as the replay brings their chunks in, and hands them to the kernel with
FUSE_NOTIFY_STORE (:meth:`~tidal.blockdev.fuse_ll.FuseDisk.push`); the application's reads of
them are then page-cache hits below ext4 (~470 FUSE reads were left in that run).

That needs the loop device to read the disk through the page cache (no direct I/O): the mount
decides both at once (:func:`tidal.blockdev.mounts.warms_page_cache`). Only read-only disks:
on a writable one, bytes read before a concurrent write would land over it in the page cache.
The pushed pages are clean page cache, reclaimed under memory pressure like any other.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from dataclasses import dataclass

from tidal.blockdev.fuse_ll import FuseDisk
from tidal.errors import FuseServerError, TidalError
from tidal.image.trace import Trace

log = logging.getLogger(__name__)

MAX_RUN_BYTES = 1 << 20
"""Neighbouring trace ranges are read and pushed together up to this size."""
OPEN_TIMEOUT_S = 30.0
"""How long the warmer waits for the disk's first open (the kernel needs the inode first)."""


def runs(trace: Trace, size_bytes: int, max_run_bytes: int = MAX_RUN_BYTES) -> list[range]:
    """The trace's ranges as page-aligned byte runs within the disk, in trace order, each
    range merged into the run before it when it starts where that one ends.

    Pages, because the kernel marks a page up to date only when a push covers all of it.
    """
    page = mmap.PAGESIZE
    out: list[range] = []
    for r in trace.ranges:
        start = r.offset_bytes - r.offset_bytes % page
        end = min(size_bytes, -(-(r.offset_bytes + r.length_bytes) // page) * page)
        if start >= end:
            continue
        if out and out[-1].stop == start and end - out[-1].start <= max_run_bytes:
            out[-1] = range(out[-1].start, end)
        else:
            out.append(range(start, end))
    return out


@dataclass(frozen=True)
class WarmStats:
    runs: int
    pushed_runs: int
    pushed_bytes: int
    errors: int
    done: bool
    seconds: float


class TraceWarmer:
    """Reads ``trace``'s runs from the disk's device and pushes them, from a thread of its own;
    ``cancel()`` it before the disk closes."""

    def __init__(self, disk: FuseDisk, trace: Trace, *, max_run_bytes: int = MAX_RUN_BYTES):
        if not disk.device.readonly:
            raise FuseServerError(f"{disk.name}: only a read-only disk's page cache is warmed")
        self.disk = disk
        self.runs = runs(trace, disk.device.size_bytes, max_run_bytes)
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"warm-{disk.name}", daemon=True)
        self._pushed_runs = self._pushed_bytes = self._errors = 0
        self._t0 = self._t1 = 0.0

    def start(self) -> TraceWarmer:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def cancel(self, timeout_s: float = 5.0) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def wait(self, timeout_s: float | None = None) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def stats(self) -> WarmStats:
        done = self._t1 > 0
        end = self._t1 if done else time.monotonic()
        return WarmStats(
            runs=len(self.runs),
            pushed_runs=self._pushed_runs,
            pushed_bytes=self._pushed_bytes,
            errors=self._errors,
            done=done,
            seconds=round(end - self._t0, 3) if self._t0 else 0.0,
        )

    def _run(self) -> None:
        try:
            while not self.disk.opened.wait(0.1):
                if self._cancelled.is_set() or time.monotonic() - self._t0 > OPEN_TIMEOUT_S:
                    return
            for run in self.runs:
                if self._cancelled.is_set():
                    return
                try:
                    data = self.disk.device.read(run.start, len(run))
                except (TidalError, OSError) as exc:  # the application's own read reports it
                    self._errors += 1
                    log.debug("%s: warming [%d, %d): %s", self.disk.name, run.start, run.stop, exc)
                    continue
                try:
                    self.disk.push(run.start, data)
                except FuseServerError as exc:  # closed or unmounted meanwhile, or refused
                    if not self._cancelled.is_set():
                        self._errors += 1
                        log.info("%s; the page cache is not warmed further", exc)
                    return
                self._pushed_runs += 1
                self._pushed_bytes += len(data)
        finally:
            self._t1 = time.monotonic()
            s = self.stats
            log.info(
                "%s: pushed %d of %d trace runs (%d bytes) into the page cache in %.2f s",
                self.disk.name, s.pushed_runs, s.runs, s.pushed_bytes, s.seconds,
            )  # fmt: skip
