"""Tidal's own FUSE server: one BlockDevice as ``<mountpoint>/disk``, spoken over /dev/fuse.

Why hand-written, not libfuse (Tidal served through mfusepy before): a libfuse session
insists on doing FUSE_INIT itself, so it cannot take over a live connection whose server died; and the
filesystem here is one regular file in one directory, so the wire protocol it needs is a
dozen opcodes of fixed-layout structs (``include/uapi/linux/fuse.h``), decoded with
``struct``. No Python library speaks the low-level protocol (pyfuse3 wraps libfuse's
low-level API, with the same INIT rule).

- :meth:`FuseDisk.mount` opens /dev/fuse, mounts it with mount(2)
  (``fuse.tidal``, source ``tidal``), answers INIT and serves from N threads, each reading its
  own clone of the connection's fd (FUSE_DEV_IOC_CLONE), so reads run in parallel.
- Given an :class:`~tidal.blockdev.fdstore.FdStore`, it hands the connection's fds and what
  INIT negotiated to the store's holder process. After this server is killed, the kernel
  keeps the connection (the holder still has it open) and parks what was in flight in its
  processing queues; :meth:`FuseDisk.resume` serves the same connection from a new process
  and writes FUSE_NOTIFY_RESEND (Linux >= 6.9, protocol 7.40), which puts those requests
  back in the input queue: the reader sees a pause, not EIO.

Behaviour is what the mfusepy adapter did: device failures become EIO with a log line naming
the byte range; :class:`IoCounters` and :class:`ReadLatency` say what was served. Both the
node service (many disks per process) and the per-mount server ``serve.py`` use it. errno
values are raised only here.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidal.blockdev import ext4
from tidal.errors import FuseServerError, MountError, TidalError
from tidal.image.device import BlockDevice

if TYPE_CHECKING:
    from tidal.blockdev.fdstore import FdStore

log = logging.getLogger(__name__)

DISK_NAME = "disk"
DEV_FUSE = "/dev/fuse"
FSTYPE = "fuse.tidal"
SOURCE = "tidal"
DEFAULT_THREADS = 2
"""Serving threads per disk (each holds a request-sized buffer): reads release the GIL in the
kernel and in lz4/zstd/sha256. On the 2-core machine 2 threads beat 4 on sequential reads
(loop device 169 vs 117 MB/s, ``bench_blockdev.py --servers --fuse-ll-variants``) with the
same 4 KiB IOPS and less CPU; 1 thread halves the IOPS, 8 gained nothing."""
MAX_PAGES_LIMIT = Path("/proc/sys/fs/fuse/max_pages_limit")
"""How many pages one FUSE request may carry (Linux >= 6.13; 256 before, and by default)."""
KERNEL_DEFAULT_MAX_PAGES = 256


def kernel_max_io_bytes() -> int:
    """The largest READ/WRITE this kernel allows: ``max_pages_limit`` pages (1 MiB default)."""
    try:
        pages = int(MAX_PAGES_LIMIT.read_text())
    except (OSError, ValueError):
        pages = KERNEL_DEFAULT_MAX_PAGES
    return max(1, min(pages, 0xFFFF)) * mmap.PAGESIZE


ATTR_TIMEOUT_S = 3600
"""The disk never changes size or identity behind the kernel's back."""
INIT_TIMEOUT_S = 10.0
"""The kernel queues INIT inside mount(2); it is there at once or never."""
MAX_BACKGROUND = 64
"""Async requests (readahead, async direct I/O from the loop driver) queued at once; the
kernel's default of 12 measured within the noise of this (``--fuse-ll-variants``), so this
only keeps the queue from being the limit on a node with more cores."""
UNMOUNT_BUSY_S = 10.0
"""How long an unmount retries while the disk is busy: ``losetup -d`` only marks a loop
device for autoclear, and it lets go of the disk when its last opener does (a probe, or a
copy of the ext4 mount in a mount namespace made meanwhile); that took over 2 s here, and
in two bench runs on the loaded machine over 30 s (the bench then unmounts lazily)."""
MIN_KERNEL_MINOR = 31
"""7.31 (Linux 5.4): max_pages and the 64-byte init_out this server writes."""
OUR_MINOR = 45
RESEND_MINOR = 40

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 34, 36, 38, 42, 43
NOTIFY_STORE, NOTIFY_RESEND = 4, 7
UNIQUE_RESEND = 1 << 63

# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES | INIT_EXT
"""Not PARALLEL_DIROPS (one directory, nothing to parallelise), not WRITEBACK_CACHE (a write
the kernel acknowledged must be in the device), not AUTO_INVAL_DATA (the disk never changes)."""

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FOPEN_KEEP_CACHE = 1 << 1
ROOT_ID, DISK_ID = 1, 2
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
DT_DIR, DT_REG = 4, 8

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_pages map_alignment flags2 stack
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # + ATTR
ATTR_OUT = struct.Struct("<QII")  # + ATTR
OPEN_OUT = struct.Struct("<QIi")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
SETATTR_IN = struct.Struct("<IIQQ")  # valid pad fh size (the rest is not used)
OPEN_IN = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")
STATFS_OUT = struct.Struct("<QQQQQIII28x")
DIRENT = struct.Struct("<QQII")
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid offset size pad
U32 = struct.Struct("<I")
H = IN_HEADER.size


class _Errno(Exception):
    """Answer the request with this errno (internal to the dispatch loop)."""

    def __init__(self, code: int) -> None:
        self.code = code


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled; a resuming server never sees INIT, so it is stored with the fds."""

    kernel_minor: int
    minor: int
    flags: int
    max_write: int
    max_readahead: int

    @property
    def resend(self) -> bool:
        """Whether the kernel takes FUSE_NOTIFY_RESEND (it says so in INIT from 7.40 on)."""
        return bool(self.flags & HAS_RESEND) or self.kernel_minor >= RESEND_MINOR

    def to_meta(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Negotiated:
        try:
            return cls(**{k: int(meta[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise FuseServerError(
                f"stored FUSE negotiation {meta!r} is incomplete ({exc}); the connection "
                "cannot be resumed, unmount it"
            ) from exc


# --- what the disk served -------------------------------------------------------------------


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


def disk_inode(name: str) -> int:
    """The disk's inode number, from its name: the same across a resume (the kernel keeps the
    inode), different between disks. A loop device names its backing file by MAJ:MIN:INODE
    (``LoopDevice.backing_id``), and FUSE's anonymous device numbers are reused once a mount
    is gone, so a fixed inode would let a stale record's teardown match another mount's loop
    device."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big") | 2


# --- mount(2) and friends --------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _open_dev_fuse() -> int:
    try:
        return os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseServerError(
            f"{DEV_FUSE} is missing: load the fuse module (modprobe fuse) or, in a container, "
            f"pass the device in (--device {DEV_FUSE})"
        ) from None
    except OSError as exc:
        raise FuseServerError(f"cannot open {DEV_FUSE}: {exc.strerror}") from exc


def _connected(fd: int) -> bool:
    """Whether the connection of ``fd`` still stands (/dev/fuse polls POLLERR once aborted)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not any(ev & select.POLLERR for _fd, ev in poller.poll(0))


def _clone(fd: int) -> int:
    new = _open_dev_fuse()
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, U32.pack(fd))
    except OSError as exc:
        os.close(new)
        raise FuseServerError(f"cloning FUSE connection fd {fd} failed: {exc.strerror}") from exc
    return new


def _mount(fd: int, mountpoint: Path, *, readonly: bool, max_io_bytes: int) -> None:
    opts = (
        f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
        f"allow_other,default_permissions,max_read={max_io_bytes}"
    )
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    if _libc.mount(SOURCE.encode(), bytes(mountpoint), FSTYPE.encode(), flags, opts.encode()):
        err = ctypes.get_errno()
        raise MountError(f"mounting {FSTYPE} at {mountpoint} failed: {os.strerror(err)}")


def umount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount a FuseDisk's mountpoint (its server's threads then see ENODEV and stop)."""
    if _libc.umount2(bytes(mountpoint), MNT_DETACH if lazy else 0):
        err = ctypes.get_errno()
        hint = " (detach the loop device on its disk first)" if err == errno.EBUSY else ""
        raise MountError(f"unmounting {mountpoint} failed: {os.strerror(err)}{hint}")


# --- the server ------------------------------------------------------------------------------


class FuseDisk:
    """One BlockDevice served as ``<mountpoint>/disk`` from threads of this process.

    Build with :meth:`mount` (a new connection) or :meth:`resume` (a live connection whose
    server died). ``fd`` is the connection's session fd; ``counters`` and ``read_latency``
    what it served.
    """

    def __init__(
        self,
        device: BlockDevice,
        fds: list[int],
        mountpoint: Path,
        negotiated: Negotiated,
        *,
        name: str,
        fdstore: FdStore | None,
    ) -> None:
        self.device = device
        self.mountpoint = mountpoint
        self.name = name
        self.negotiated = negotiated
        self.fdstore = fdstore
        self.counters = IoCounters()
        self.read_latency = ReadLatency()
        self.resent = 0
        """Requests the kernel resent after a takeover (a dead server had taken them)."""
        self._fds = fds
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()  # a push never writes to an fd close() has closed
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._size = device.size_bytes
        self.opened = threading.Event()
        """Set at the disk's first OPEN: the kernel has its inode (what :meth:`push` needs)."""
        self._disk_ino = disk_inode(name)
        self._bufsize = negotiated.max_write + 4096
        now = time.time_ns()
        self._time = (now // 10**9, now % 10**9)
        self._ops: dict[int, Callable[[memoryview, int], bytes | None]] = {
            LOOKUP: self._lookup,
            FORGET: _no_reply,
            BATCH_FORGET: _no_reply,
            INTERRUPT: _no_reply,
            GETATTR: self._getattr,
            SETATTR: self._setattr,
            OPEN: self._open,
            OPENDIR: self._opendir,
            READ: self._read,
            WRITE: self._write,
            READDIR: self._readdir,
            RELEASE: _empty,
            RELEASEDIR: _empty,
            FLUSH: _empty,
            FSYNCDIR: _empty,
            ACCESS: _empty,
            FSYNC: self._fsync,
            FALLOCATE: self._fallocate,
            STATFS: self._statfs,
            DESTROY: self._destroy,
        }

    @property
    def fd(self) -> int:
        return self._fds[0]

    @property
    def disk_path(self) -> Path:
        return self.mountpoint / DISK_NAME

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def mount(
        cls,
        device: BlockDevice,
        mountpoint: Path | str,
        *,
        name: str,
        fdstore: FdStore | None = None,
        threads: int = DEFAULT_THREADS,
        max_io_bytes: int | None = None,
        max_background: int = MAX_BACKGROUND,
    ) -> FuseDisk:
        """Mount a new connection at ``mountpoint`` (an existing directory) and serve it, in
        requests of up to ``max_io_bytes`` (default: as large as the kernel allows), with up
        to ``max_background`` async requests (readahead, async direct I/O) in flight."""
        mountpoint = Path(mountpoint)
        limit = kernel_max_io_bytes()
        max_io_bytes = limit if max_io_bytes is None else min(max_io_bytes, limit)
        max_io_bytes -= max_io_bytes % mmap.PAGESIZE
        if threads < 1:
            raise FuseServerError(f"{name}: threads must be >= 1, not {threads}")
        fd = _open_dev_fuse()
        fds = [fd]
        mounted = False
        disk: FuseDisk | None = None
        try:
            _mount(fd, mountpoint, readonly=device.readonly, max_io_bytes=max_io_bytes)
            mounted = True
            negotiated = _handshake(fd, max_io_bytes, max_background, name)
            fds += [_clone(fd) for _ in range(threads - 1)]
            disk = cls(device, fds, mountpoint, negotiated, name=name, fdstore=fdstore)
            if fdstore is not None:
                disk._store()
            disk._start()
        except BaseException:
            if mounted:
                with contextlib.suppress(MountError):
                    umount(mountpoint, lazy=True)
            for f in fds:
                os.close(f)
            if disk is not None:
                os.close(disk._stop_fd)
            raise
        log.info(
            "%s: serving %d bytes at %s (%s, %d threads, protocol 7.%d, %d KiB requests)",
            name, device.size_bytes, disk.disk_path, "ro" if device.readonly else "rw",
            threads, negotiated.minor, negotiated.max_write >> 10,
        )  # fmt: skip
        return disk

    @classmethod
    def resume(
        cls,
        device: BlockDevice,
        fd: int,
        mountpoint: Path | str,
        *,
        name: str,
        fdstore: FdStore | None = None,
        negotiated: Negotiated | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> FuseDisk:
        """Serve the live connection ``fd`` (mounted at ``mountpoint``, its server gone).

        What INIT negotiated comes from ``negotiated`` or the fd store's entry ``name``; the
        clones held there are served too (their requests in flight are resent with the rest).
        The FuseDisk owns ``fd`` from here on. Readers wait for the new server as long as it
        takes, unless ``fs.fuse.default_request_timeout`` (Linux >= 6.14, 0 by default) is
        set: then the kernel aborts the connection when a request waits longer.
        """
        mountpoint = Path(mountpoint)
        extra: list[int] = []
        entry = fdstore.entry(name) if fdstore is not None else None
        if entry is not None:
            os.close(entry.fds[0])  # a second dup of ``fd``
            extra = entry.fds[1:]
            if negotiated is None:
                negotiated = Negotiated.from_meta(entry.meta)
        fds = [fd, *extra]
        disk: FuseDisk | None = None
        try:
            stored_at = entry.meta.get("mountpoint") if entry is not None else None
            if stored_at is not None and Path(stored_at) != mountpoint:
                raise FuseServerError(
                    f"{name}: the fd store holds the connection of {stored_at}, not of "
                    f"{mountpoint}; resume it there"
                )
            if negotiated is None:
                raise FuseServerError(
                    f"{name}: no record of what the connection at {mountpoint} negotiated "
                    "(no fd store entry, none given); it cannot be resumed, unmount it"
                )
            if not negotiated.resend:
                raise FuseServerError(
                    f"{name}: this kernel (FUSE protocol 7.{negotiated.kernel_minor}) cannot "
                    "resend requests a dead server had taken (FUSE_NOTIFY_RESEND needs 7.40, "
                    f"Linux >= 6.9); the connection at {mountpoint} cannot be resumed safely"
                )
            if not _connected(fd):
                if fdstore is not None:
                    fdstore.drop(name)
                raise FuseServerError(
                    f"{name}: the FUSE connection of {mountpoint} is gone (unmounted or "
                    "aborted while no server served it); nothing to resume"
                    + ("; its fd store entry was dropped" if fdstore is not None else "")
                )
            while len(fds) < threads:
                fds.append(_clone(fd))
            disk = cls(device, fds, mountpoint, negotiated, name=name, fdstore=fdstore)
            if fdstore is not None:
                disk._store()
            disk._start()
        except BaseException:
            for f in fds:
                os.close(f)
            if disk is not None:
                os.close(disk._stop_fd)
            raise
        try:
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
        except OSError as exc:
            disk.close(unmount=False)
            raise FuseServerError(
                f"{name}: the kernel refused FUSE_NOTIFY_RESEND on {mountpoint}: {exc.strerror}"
            ) from exc
        log.info("%s: resumed the connection at %s (%d threads)", name, mountpoint, len(fds))
        return disk

    def _store(self) -> None:
        assert self.fdstore is not None
        meta = {**self.negotiated.to_meta(), "mountpoint": str(self.mountpoint)}
        self.fdstore.put(self.name, self._fds[0], extra_fds=self._fds[1:], meta=meta)

    def _start(self) -> None:
        for i, fd in enumerate(self._fds):
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            t = threading.Thread(
                target=self._serve, args=(fd,), name=f"fuse-{self.name}-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def close(self, unmount: bool = True, *, busy_timeout_s: float = UNMOUNT_BUSY_S) -> None:
        """Stop serving. ``unmount``: unmount the disk (MountError if still busy after
        ``busy_timeout_s``; it goes on serving then) and drop the fd store's entry; else
        leave the connection to the fd store (or, with none, to the kernel, which fails its
        requests once the last fd is closed)."""
        if self._closed:
            return
        if unmount:
            self._unmount(busy_timeout_s)
        with self._push_lock:
            self._closed = True
        os.eventfd_write(self._stop_fd, 1)
        for t in self._threads:
            t.join()
        if unmount and self.fdstore is not None:
            self.fdstore.drop(self.name)
        for fd in self._fds:
            os.close(fd)
        os.close(self._stop_fd)
        with contextlib.suppress(Exception):
            self.device.flush()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the connection ends (the disk was unmounted: every serving thread saw
        ENODEV) or ``timeout_s`` passes; True if it ended."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def push(self, offset: int, data: bytes) -> None:
        """Put ``data``, the disk's bytes at ``offset``, into the kernel's page cache of the
        disk (FUSE_NOTIFY_STORE), so buffered reads of them need no request. Read-only disks
        only (see :mod:`tidal.blockdev.warm`). FuseServerError once closed or if the kernel
        refuses (ENOENT: it holds no inode of the disk, nothing has opened it yet)."""
        if not self.device.readonly:
            raise FuseServerError(f"{self.name}: a writable disk's page cache is not pushed to")
        if offset < 0 or offset + len(data) > self._size:
            raise FuseServerError(
                f"{self.name}: push of [{offset}, {offset + len(data)}) is outside the disk"
            )
        head = OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_STORE_OUT.size + len(data), NOTIFY_STORE, 0)
        with self._push_lock:
            if self._closed:
                raise FuseServerError(f"{self.name}: the disk is closed")
            try:
                os.writev(
                    self._fds[0], [head, NOTIFY_STORE_OUT.pack(DISK_ID, offset, len(data), 0), data]
                )
            except OSError as exc:
                what = "nothing has it open" if exc.errno == errno.ENOENT else exc.strerror
                raise FuseServerError(
                    f"{self.name}: the kernel refused a page-cache push of [{offset}, "
                    f"{offset + len(data)}): {what}"
                ) from exc

    def _unmount(self, busy_timeout_s: float) -> None:
        """Unmount, retried for a while on EBUSY (see ``UNMOUNT_BUSY_S``)."""
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                umount(self.mountpoint)
                return
            except MountError:
                if not ext4.is_mountpoint(self.mountpoint):
                    return  # unmounted by someone else already (umount -l): nothing to undo
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> FuseDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop ----------------------------------------------------------------------------

    def _serve(self, fd: int) -> None:
        buf = bytearray(self._bufsize)
        mv = memoryview(buf)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        ops = self._ops
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                if any(f == self._stop_fd for f, _ in poller.poll()):
                    return
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue  # interrupted, or the request was withdrawn meanwhile
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("%s: reading %s failed, thread stops: %s", self.name, DEV_FUSE, exc)
                return
            _len, opcode, unique, nodeid = IN_HEADER.unpack_from(mv)[:4]
            if unique & UNIQUE_RESEND:
                with self._lock:
                    self.resent += 1
            op = ops.get(opcode)
            try:
                if op is None:
                    raise _Errno(errno.ENOSYS)
                out = op(mv[:n], nodeid)
                if out is None:
                    continue
                self._reply(fd, [OUT_HEADER.pack(OUT_HEADER.size + len(out), 0, unique), out])
            except _Errno as e:
                self._reply(fd, [OUT_HEADER.pack(OUT_HEADER.size, -e.code, unique)])
            except Exception:
                log.exception("%s: opcode %d failed, answering EIO", self.name, opcode)
                self._reply(fd, [OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)])

    def _reply(self, fd: int, parts: list[bytes]) -> None:
        try:
            os.writev(fd, parts)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted; unmounted
                log.error("%s: replying on %s failed: %s", self.name, DEV_FUSE, exc)

    # --- operations --------------------------------------------------------------------------

    def _attr(self, nodeid: int) -> bytes:
        s, ns = self._time
        if nodeid == ROOT_ID:
            mode, nlink, size = stat.S_IFDIR | 0o755, 2, 0
        elif nodeid == DISK_ID:
            mode = stat.S_IFREG | (0o400 if self.device.readonly else 0o600)
            nlink, size = 1, self._size
        else:
            raise _Errno(errno.ENOENT)
        uid, gid = os.getuid(), os.getgid()
        blocks = (size + 511) // 512
        ino = self._disk_ino if nodeid == DISK_ID else nodeid
        return ATTR.pack(ino, size, blocks, s, s, s, ns, ns, ns, mode, nlink, uid, gid, 0,
                         4096, 0)  # fmt: skip

    def _lookup(self, req: memoryview, nodeid: int) -> bytes:
        name = bytes(req[H:]).rstrip(b"\0")
        if nodeid != ROOT_ID or name != DISK_NAME.encode():
            raise _Errno(errno.ENOENT)
        return ENTRY_OUT.pack(DISK_ID, 0, ATTR_TIMEOUT_S, ATTR_TIMEOUT_S, 0, 0) + self._attr(
            DISK_ID
        )

    def _getattr(self, req: memoryview, nodeid: int) -> bytes:
        return ATTR_OUT.pack(ATTR_TIMEOUT_S, 0, 0) + self._attr(nodeid)

    def _setattr(self, req: memoryview, nodeid: int) -> bytes:
        valid, _pad, _fh, size = SETATTR_IN.unpack_from(req, H)
        if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise _Errno(errno.EROFS)  # chmod/chown of a disk: refused, as libfuse's default
        if valid & FATTR_SIZE and (nodeid != DISK_ID or size != self._size):
            raise _Errno(errno.EPERM)  # a disk does not change size
        return self._getattr(req, nodeid)  # times: accepted, not kept

    def _open(self, req: memoryview, nodeid: int) -> bytes:
        (flags,) = U32.unpack_from(req, H)
        if nodeid == ROOT_ID:
            raise _Errno(errno.EISDIR)
        if nodeid != DISK_ID:
            raise _Errno(errno.ENOENT)
        if self.device.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise _Errno(errno.EROFS)
        self.opened.set()
        return OPEN_OUT.pack(0, FOPEN_KEEP_CACHE, 0)  # contents never change: keep the cache

    def _opendir(self, req: memoryview, nodeid: int) -> bytes:
        if nodeid != ROOT_ID:
            raise _Errno(errno.ENOTDIR)
        return OPEN_OUT.pack(0, 0, 0)

    def _readdir(self, req: memoryview, nodeid: int) -> bytes:
        _fh, offset, size = READ_IN.unpack_from(req, H)[:3]
        out = bytearray()
        entries = ((ROOT_ID, b".", DT_DIR), (ROOT_ID, b"..", DT_DIR), (DISK_ID, b"disk", DT_REG))
        for i, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
            rec = DIRENT.pack(ino, i, len(name), kind) + name
            rec += bytes(-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def _read(self, req: memoryview, nodeid: int) -> bytes:
        _fh, offset, size = READ_IN.unpack_from(req, H)[:3]
        end = min(offset + size, self._size)
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

    def _write(self, req: memoryview, nodeid: int) -> bytes:
        _fh, offset, size = WRITE_IN.unpack_from(req, H)[:3]
        if self.device.readonly:
            raise _Errno(errno.EROFS)
        if offset + size > self._size:
            raise _Errno(errno.ENOSPC)
        start = H + WRITE_IN.size
        try:
            self.device.write(offset, bytes(req[start : start + size]))
        except Exception as exc:
            self._fail("write", offset, size, exc)
        with self._lock:
            self.counters.writes += 1
            self.counters.bytes_written += size
        return WRITE_OUT.pack(size, 0)

    def _fsync(self, req: memoryview, nodeid: int) -> bytes:
        try:
            self.device.flush()
        except Exception as exc:
            self._fail("flush", 0, self._size, exc)
        with self._lock:
            self.counters.flushes += 1
        return b""

    def _fallocate(self, req: memoryview, nodeid: int) -> bytes:
        """Punch-hole and zero-range (what the loop driver sends for DISCARD / WRITE_ZEROES)."""
        _fh, offset, length, mode, _pad = FALLOCATE_IN.unpack_from(req, H)
        if self.device.readonly:
            raise _Errno(errno.EROFS)
        if mode & ~(_FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE):
            raise _Errno(errno.EOPNOTSUPP)
        end = min(offset + length, self._size)
        if not mode & (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE) or offset >= end:
            return b""  # plain allocation: every sector of a virtual disk already exists
        try:
            zero_range(self.device, offset, end - offset)
        except Exception as exc:
            self._fail("zero", offset, end - offset, exc)
        return b""

    def _statfs(self, req: memoryview, nodeid: int) -> bytes:
        return STATFS_OUT.pack(self._size // 512, 0, 0, 0, 0, 4096, 255, 512)

    def _destroy(self, req: memoryview, nodeid: int) -> bytes:
        try:
            self.device.flush()
        except Exception:
            log.exception("%s: flush at unmount failed", self.name)
        return b""

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
        raise _Errno(errno.EIO) from exc


def _no_reply(req: memoryview, nodeid: int) -> None:
    return None


def _empty(req: memoryview, nodeid: int) -> bytes:
    return b""


def _handshake(fd: int, max_io_bytes: int, max_background: int, name: str) -> Negotiated:
    """Answer the kernel's INIT on a freshly mounted ``fd``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(INIT_TIMEOUT_S * 1000):
        raise FuseServerError(f"{name}: the kernel sent no FUSE INIT within {INIT_TIMEOUT_S} s")
    req = os.read(fd, max_io_bytes + 4096)
    _len, opcode, unique = IN_HEADER.unpack_from(req)[:3]
    if opcode != INIT:
        raise FuseServerError(f"{name}: the kernel's first request was opcode {opcode}, not INIT")
    body = req[H:] + bytes(INIT_IN.size)
    major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body)
    if major != 7 or minor < MIN_KERNEL_MINOR:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, -errno.EPROTO, unique))
        raise FuseServerError(
            f"{name}: the kernel speaks FUSE {major}.{minor}; this server needs 7."
            f"{MIN_KERNEL_MINOR} or later (Linux >= 5.4)"
        )
    offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
    want = WANTED_FLAGS & offered
    pages = max_io_bytes // mmap.PAGESIZE
    out = INIT_OUT.pack(
        7, min(minor, OUR_MINOR), min(max_readahead, max_io_bytes), want & 0xFFFFFFFF,
        max_background, max_background * 3 // 4, max_io_bytes, 1, pages, 0, want >> 32, 0,
    )  # fmt: skip
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(out), 0, unique) + out)
    return Negotiated(
        kernel_minor=minor,
        minor=min(minor, OUR_MINOR),
        flags=want | (offered & HAS_RESEND),
        max_write=max_io_bytes,
        max_readahead=min(max_readahead, max_io_bytes),
    )
