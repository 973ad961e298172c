"""A FuseDisk server in a process of its own, for the takeover tests (run as a script).

``python fuse_ll_child.py IMAGE MNT SOCKET NAME [--writable W] [--resume] [--delay-s S]
[--stall-after-bytes N] [--stats FILE]``: serves the image (or a writable layer on it) at
``MNT/disk``, its fds in the fd store at ``SOCKET``, and prints ``ready``. ``--delay-s``
makes every read sleep first (a slow lazy fetch); after ``--stall-after-bytes``, reads hang, so requests are surely in flight when the test kills it. ``--stats`` gets the
bytes read, requests resent and reads stalled every 20 ms. SIGTERM: unmount, close, print ``closed``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tidal.blockdev.fdstore import FdStore
from tidal.blockdev.fuse_ll import FuseDisk
from tidal.image.device import BlockDevice
from tidal.image.manifest import Image

HERE = Path(__file__)


class SlowDevice:
    """``device`` whose reads take ``delay_s`` longer; once it served ``stall_after_bytes``,
    reads never return (counted in ``stalled``): a server about to be killed with requests
    surely in flight, decided here rather than by a test that may be scheduled late."""

    def __init__(self, device: BlockDevice, delay_s: float, stall_after_bytes: int | None) -> None:
        self.device = device
        self.delay_s = delay_s
        self.stall_after_bytes = stall_after_bytes
        self.size_bytes = device.size_bytes
        self.readonly = device.readonly
        self.bytes_read = 0
        self.stalled = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(self.delay_s)
        with self._lock:
            stall = self.stall_after_bytes is not None and self.bytes_read >= self.stall_after_bytes
            self.stalled += stall
            self.bytes_read += 0 if stall else length
        if stall:
            threading.Event().wait()  # until the test kills this process
        return self.device.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.device.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self.device.discard(offset, length)

    def flush(self) -> None:
        self.device.flush()


@contextlib.contextmanager
def holder() -> Iterator[FdStore]:
    """An fd store of the test's own on a short socket path, its holder killed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="fds-", dir="/tmp"))
    store = FdStore.ensure(work / "fds.sock")
    pid = store.holder_pid()
    try:
        yield store
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("mnt", type=Path)
    ap.add_argument("socket", type=Path)
    ap.add_argument("name")
    ap.add_argument("--writable", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--stall-after-bytes", type=int)
    ap.add_argument("--stats", type=Path)
    args = ap.parse_args()
    image = Image.open(args.image)
    base = image.writable(args.writable) if args.writable else image.merged_view()
    slow = SlowDevice(base, args.delay_s, args.stall_after_bytes)
    device: BlockDevice = slow if args.delay_s or args.stall_after_bytes is not None else base
    store = FdStore(args.socket)
    if args.resume:
        fd = store.get(args.name)
        if fd is None:
            print(f"error: nothing held under {args.name}", flush=True)
            return 1
        disk = FuseDisk.resume(device, fd, args.mnt, name=args.name, fdstore=store)
    else:
        disk = FuseDisk.mount(device, args.mnt, name=args.name, fdstore=store)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def stats() -> None:
        while not stop.is_set():
            doc = {
                "bytes_read": disk.counters.bytes_read,
                "resent": disk.resent,
                "stalled": slow.stalled,
            }
            tmp = args.stats.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.rename(args.stats)
            time.sleep(0.02)

    if args.stats:
        threading.Thread(target=stats, daemon=True).start()
    print("ready", flush=True)
    stop.wait()
    # other runs on this machine unshare mount namespaces, and their copy of the ext4 mount
    # keeps our detached loop device (and so the disk) busy until they end
    disk.close(unmount=True, busy_timeout_s=60)
    close = getattr(base, "close", None)
    if close is not None:
        close()
    print("closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
