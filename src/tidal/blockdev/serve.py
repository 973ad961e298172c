"""The FUSE block device server: ``python -m tidal.blockdev.serve IMAGE MOUNTPOINT [...]``.

One process per mounted image, so that a crash of one image's server takes down one mount,
and so that the process that asked for the mount (a CLI, the engine) may exit. It opens the
image (and the writable layer, if any), serves ``MOUNTPOINT/disk`` in the foreground, and
reports on ``--ready-fd``: one line, ``ready`` or ``error: <message>``. At unmount (or on
SIGTERM, which libfuse turns into a clean exit) it flushes and closes the writable layer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tidal.blockdev.fuse_device import BlockDeviceFS, serve
from tidal.errors import TidalError
from tidal.image.device import BlockDevice
from tidal.image.manifest import Image
from tidal.image.writable import WritableLayer

log = logging.getLogger("tidal.blockdev.serve")


class _ReadyPipe:
    """Writes the one readiness line at most once."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.sent_ready = False

    def send(self, line: str) -> None:
        self.sent_ready = self.sent_ready or line == "ready"
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the parent gave up waiting; nothing to tell
        finally:
            os.close(self.fd)
            self.fd = None


def open_device(image_dir: Path, writable_dir: Path | None) -> BlockDevice:
    """The device a mount serves: the merged image, or a writable layer over it."""
    image = Image.open(image_dir)
    if writable_dir is None:
        return image.merged_view()
    return image.writable(writable_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidal.blockdev.serve", description=__doc__)
    parser.add_argument("image", type=Path, help="image directory (holds manifest.json)")
    parser.add_argument("mountpoint", type=Path, help="directory where <mountpoint>/disk appears")
    parser.add_argument("--writable", type=Path, help="writable layer directory (read-write)")
    parser.add_argument("--ready-fd", type=int, help="file descriptor to report readiness on")
    parser.add_argument("--max-io-bytes", type=int, default=1 << 20)
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TIDAL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    ready = _ReadyPipe(args.ready_fd)
    try:
        device = open_device(args.image, args.writable)
    except TidalError as exc:
        ready.send(f"error: {exc}")
        return 1
    fs = BlockDeviceFS(
        device,
        name=str(args.image),
        max_io_bytes=args.max_io_bytes,
        on_ready=lambda: ready.send("ready"),
    )
    log.info(
        "serving %s%s at %s/disk (%d bytes)",
        args.image,
        f" + writable {args.writable}" if args.writable else " read-only",
        args.mountpoint,
        device.size_bytes,
    )
    status = 0
    try:
        serve(fs, str(args.mountpoint), readonly=device.readonly, debug=args.debug)
    except RuntimeError as exc:
        if ready.sent_ready:
            # libfuse ends its loop with an error status when SIGTERM/SIGINT/SIGHUP stops it;
            # the session was served and is unmounted: a normal stop
            log.info("FUSE server for %s stopped by a signal (libfuse status %s)", args.image, exc)
        else:
            log.error("FUSE server for %s could not mount: libfuse status %s", args.image, exc)
            ready.send(f"error: FUSE mount at {args.mountpoint} failed (libfuse status {exc})")
            status = 1
    except Exception as exc:
        log.error("FUSE server for %s stopped: %s", args.image, exc)
        ready.send(f"error: FUSE mount at {args.mountpoint} failed: {exc}")
        status = 1
    finally:
        if isinstance(device, WritableLayer):
            try:
                device.flush()
            finally:
                device.close()
        log.info(
            "stopped %s: %d reads (%d bytes), %d writes (%d bytes), %d errors",
            args.image,
            fs.counters.reads,
            fs.counters.bytes_read,
            fs.counters.writes,
            fs.counters.bytes_written,
            fs.counters.errors,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
