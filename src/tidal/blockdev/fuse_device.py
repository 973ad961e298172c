"""A BlockDevice exposed as one regular file through FUSE: ``<mountpoint>/disk``.

The kernel's loop driver then turns that file into ``/dev/loopN`` for ext4. This adapter is
deliberately thin (the fsspec way): it translates FUSE calls into ``device.read/write/flush``
and device failures into ``EIO``; errno values appear only here. Every failure is logged with
the byte range and its cause, because the kernel above only ever sees "I/O error".
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mfusepy

from tidal.errors import TidalError
from tidal.image.device import BlockDevice

log = logging.getLogger(__name__)

DISK_NAME = "disk"
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


@dataclass
class IoCounters:
    """What the adapter served; tests and benchmarks read these (not thread-exact, close enough)."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    flushes: int = 0
    errors: int = 0


READ_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
"""Upper bounds of the read-latency histogram: a page-cache-cold chunk decode takes ~0.3 ms,
a lazy fetch 10-100 ms."""


class ReadLatency:
    """A histogram of read latency (fixed buckets), exported as Prometheus by the mount.

    Hand-written rather than a ``prometheus_client.Histogram``: the FUSE server must not
    import prometheus-client before it reports ready (the mount waits for it), and the
    exporter reads these counts only when it runs, after ready.
    """

    def __init__(self, bounds: tuple[float, ...] = READ_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_s = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # first bound >= seconds ("le")
        with self._lock:
            self.counts[i] += 1
            self.sum_s += seconds

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``[(le, count), ..., ("+Inf", total)]`` and the sum, as Prometheus wants them."""
        with self._lock:
            counts, total_s = list(self.counts), self.sum_s
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total_s


class BlockDeviceFS(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations serving ``device`` as the single file ``/<file_name>``.

    ``on_ready`` runs once the kernel has completed the FUSE handshake (the file is usable);
    ``on_destroy`` runs when the filesystem is unmounted, after the device was flushed.
    """

    use_ns = True

    def __init__(
        self,
        device: BlockDevice,
        *,
        name: str = "device",
        file_name: str = DISK_NAME,
        max_io_bytes: int = 1 << 20,
        on_ready: Callable[[], None] | None = None,
        on_destroy: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.name = name
        self.file_path = "/" + file_name
        self.max_io_bytes = max_io_bytes
        self.counters = IoCounters()
        self.read_latency = ReadLatency()
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._lock = threading.Lock()
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}

    # --- lifecycle --------------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            conn_info.max_write = self.max_io_bytes
            conn_info.max_read = self.max_io_bytes  # must match the max_read mount option
            conn_info.max_readahead = self.max_io_bytes
        if config_3 is not None:
            # contents never change behind the kernel's back: keep its page cache across opens
            config_3.kernel_cache = 1
            config_3.attr_timeout = 3600.0
            config_3.entry_timeout = 3600.0
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        try:
            self.device.flush()
        except Exception:
            log.exception("%s: flush at unmount failed", self.name)
        if self._on_destroy is not None:
            self._on_destroy()

    # --- metadata ---------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **self._times}
        if path == self.file_path:
            size = self.device.size_bytes
            mode = 0o400 if self.device.readonly else 0o600
            return {
                "st_mode": stat.S_IFREG | mode,
                "st_nlink": 1,
                "st_size": size,
                "st_blocks": (size + 511) // 512,
                "st_blksize": 4096,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                **self._times,
            }
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", self.file_path[1:]]

    def statfs(self, path: str) -> dict[str, int]:
        size = self.device.size_bytes
        return {"f_bsize": 4096, "f_frsize": 512, "f_blocks": size // 512, "f_namemax": 255}

    def open(self, path: str, flags: int) -> int:
        if path != self.file_path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if self.device.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if length == self.device.size_bytes:
            return 0
        raise mfusepy.FuseOSError(errno.EPERM)  # a disk does not change size

    # --- data -------------------------------------------------------------------------------

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        end = min(offset + size, self.device.size_bytes)
        if offset >= end:
            return b""
        t0 = time.perf_counter()
        try:
            data = self.device.read(offset, end - offset)
        except Exception as exc:
            self._fail("read", offset, end - offset, exc)
        self.read_latency.observe(time.perf_counter() - t0)
        with self._lock:
            self.counters.reads += 1
            self.counters.bytes_read += len(data)
        return data

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self.device.readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset + len(data) > self.device.size_bytes:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        try:
            self.device.write(offset, data)
        except Exception as exc:
            self._fail("write", offset, len(data), exc)
        with self._lock:
            self.counters.writes += 1
            self.counters.bytes_written += len(data)
        return len(data)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        try:
            self.device.flush()
        except Exception as exc:
            self._fail("flush", 0, self.device.size_bytes, exc)
        with self._lock:
            self.counters.flushes += 1
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        """Punch-hole and zero-range (what the loop driver sends for DISCARD / WRITE_ZEROES)."""
        if self.device.readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        if mode & ~(_FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE):
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        end = min(offset + size, self.device.size_bytes)
        if not mode & (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE) or offset >= end:
            return 0  # plain allocation: every sector of a virtual disk already exists
        try:
            zero_range(self.device, offset, end - offset)
        except Exception as exc:
            self._fail("zero", offset, end - offset, exc)
        return 0

    def _fail(self, op: str, offset: int, length: int, exc: BaseException) -> Any:
        with self._lock:
            self.counters.errors += 1
        log.error(
            "%s: %s of bytes [%d, %d) failed, answering EIO: %s",
            self.name,
            op,
            offset,
            offset + length,
            exc,
            exc_info=not isinstance(exc, (TidalError, OSError)),  # a traceback only for bugs
        )
        raise mfusepy.FuseOSError(errno.EIO) from exc


def zero_range(device: BlockDevice, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros: discard whole sectors, write the edges."""
    end = offset + length
    first = -(-offset // 512) * 512
    last = (end // 512) * 512
    if first >= last:
        device.write(offset, bytes(length))
        return
    if offset < first:
        device.write(offset, bytes(first - offset))
    device.discard(first, last - first)
    if last < end:
        device.write(last, bytes(end - last))


def serve(fs: BlockDeviceFS, mountpoint: str, *, readonly: bool, debug: bool = False) -> None:
    """Serve ``fs`` at ``mountpoint`` in the foreground (multithreaded) until unmounted."""
    mfusepy.FUSE(
        fs,
        mountpoint,
        foreground=True,
        nothreads=False,
        debug=debug,
        fsname=f"tidal:{fs.name}",
        subtype="tidal-blockdev",
        max_read=fs.max_io_bytes,
        ro=readonly,
    )
