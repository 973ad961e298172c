"""The FUSE block device server: ``python -m tidal.blockdev.serve IMAGE MOUNTPOINT [...]``.

One process per mounted image, so that a crash of one image's server takes down one mount,
and so that the process that asked for the mount (a CLI, the engine) may exit. It opens the
image (and the writable layer, if any), serves ``MOUNTPOINT/disk`` in the foreground, and
reports on ``--ready-fd``: one line, ``ready`` or ``error: <message>``. At unmount (or on
SIGTERM/SIGINT/SIGHUP, a clean exit) it flushes and closes the writable layer. The disk is
served by :class:`~tidal.blockdev.fuse_ll.FuseDisk` from this process's threads, as the node
service serves many.

A *pulled* image (``tidal image pull``: a manifest and ``origin.json``, no layer data) is
served lazily: reads fetch the chunks they need from the registry through the node's chunk
cache, and a trace pushed with the image is replayed in the background. ``--stats-file``
gets the I/O counters (and, for a lazy image, bytes fetched, cache hits, prefetch progress)
every second and at exit (and its Prometheus metrics to ``metrics.prom`` beside it, from the
first second on); ``--trace-out`` records every range read into a trace file at exit,
which is how ``tidal image record`` works.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tidal.blobs.pulled import is_pulled_image
from tidal.blockdev.fuse_ll import FuseDisk, IoCounters, ReadLatency
from tidal.blockdev.warm import TraceWarmer
from tidal.errors import TidalError
from tidal.fsutil import write_bytes_atomic, write_json_atomic
from tidal.image.device import BlockDevice
from tidal.image.manifest import Image
from tidal.image.trace import TraceRecorder
from tidal.image.writable import WritableLayer

if TYPE_CHECKING:
    from tidal.blobs.distribution import LazyImage

STATS_INTERVAL_S = 1.0
STOP_BUSY_TIMEOUT_S = 2.0
"""On a signal the server unmounts its disk if it can; one still in use (a loop device on it,
after its owner died) is left to teardown, which detaches the loop device first."""
METRICS_FILE = "metrics.prom"
"""Beside ``--stats-file``: the mount's Prometheus metrics in the textfile format."""

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


class Counted(Protocol):
    """What serves a FUSE disk, as the stats writer and the metrics read it (a
    :class:`~tidal.blockdev.fuse_ll.FuseDisk`, here or in the node service)."""

    counters: IoCounters
    read_latency: ReadLatency


class Served:
    """The device a mount serves, and what must be closed with it."""

    def __init__(self, device: BlockDevice, lazy: LazyImage | None = None) -> None:
        self.device = device
        self.lazy = lazy
        self.warmer: TraceWarmer | None = None

    def warm(self, disk: FuseDisk) -> None:
        """Start pushing the image's trace into ``disk``'s page cache (a lazy image's only:
        the mount asked for it, see :func:`~tidal.blockdev.mounts.warms_page_cache`)."""
        trace = self.lazy.trace() if self.lazy is not None else None
        if trace is not None and self.device.readonly:
            self.warmer = TraceWarmer(disk, trace).start()

    def close(self) -> None:
        if self.warmer is not None:
            self.warmer.cancel()
        try:
            if isinstance(self.device, WritableLayer):
                self.device.flush()
                self.device.close()
            elif self.lazy is not None:
                close = getattr(self.device, "close", None)
                if close is not None:
                    close()
        finally:
            if self.lazy is not None:
                self.lazy.close()


def open_device(image_dir: Path, writable_dir: Path | None) -> Served:
    """The device a mount serves: the merged image, or a writable layer over it.

    A pulled image is opened lazily (registry, chunk cache, trace prefetch).
    """
    if is_pulled_image(image_dir):
        from tidal.blobs.distribution import open_pulled_image  # httpx: only for pulled images

        lazy = open_pulled_image(image_dir)
        try:
            return Served(lazy.device(writable_dir), lazy)
        except BaseException:
            lazy.close()
            raise
    image = Image.open(image_dir)
    if writable_dir is None:
        return Served(image.merged_view())
    return Served(image.writable(writable_dir))


def stats_doc(fs: Counted, served: Served) -> dict[str, object]:
    """What ``tidal image stats`` shows: FUSE I/O counters, and the lazy image's figures."""
    return {
        "fuse": asdict(fs.counters),
        "lazy": served.lazy.stats_doc() if served.lazy is not None else None,
        "warm": asdict(served.warmer.stats) if served.warmer is not None else None,
    }


class MountMetrics:
    """A Prometheus collector over one mount's counters, read when scraped: reads, bytes read,
    read latency (the FUSE adapter's :class:`~tidal.blockdev.fuse_ll.ReadLatency`) and,
    for a lazy image, bytes fetched, cache hits and P2P bytes by source.

    Exported where it costs the mount nothing: into ``<run>/metrics.prom`` (node_exporter's
    textfile format) by the stats writer, whose first metrics write comes after ``ready``,
    and on ``/metrics`` of the mount's P2P peer server when it has one. Neither adds a
    server, a socket or an import before the mount is ready.
    """

    def __init__(self, fs: Counted, served: Served, image: str) -> None:
        self.fs = fs
        self.served = served
        self.labels = {"image": image}

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily

        from tidal.service.server import counter_families

        names, values = list(self.labels), list(self.labels.values())
        c = self.fs.counters
        yield from counter_families(
            self.labels,
            (
                ("tidal_mount_reads", "Reads the FUSE device served", c.reads),
                ("tidal_mount_read_bytes", "Bytes the FUSE device served", c.bytes_read),
                ("tidal_mount_errors", "Requests answered with EIO", c.errors),
            ),
        )
        buckets, sum_s = self.fs.read_latency.cumulative()
        latency = HistogramMetricFamily(
            "tidal_mount_read_seconds", "Time to serve one FUSE read", labels=names
        )
        latency.add_metric(values, buckets, sum_s)
        yield latency
        if self.served.lazy is not None:
            from tidal.blobs.distribution import LazyImageMetrics

            yield from LazyImageMetrics(self.served.lazy, self.labels).collect()


class StatsWriter(threading.Thread):
    """Writes :func:`stats_doc` to a file every ``interval_s`` until stopped, and the
    mount's Prometheus metrics to ``metrics_path`` (from its first round on: after ready)."""

    def __init__(
        self,
        path: Path,
        fs: Counted,
        served: Served,
        interval_s: float,
        metrics: MountMetrics | None = None,
        metrics_path: Path | None = None,
    ) -> None:
        super().__init__(name="stats-writer", daemon=True)
        self.path = path
        self.fs = fs
        self.served = served
        self.interval_s = interval_s
        self.metrics = metrics
        self.metrics_path = metrics_path
        self._registry: Any = None
        self.stopped = threading.Event()

    def write(self) -> None:
        try:
            write_json_atomic(self.path, stats_doc(self.fs, self.served))
        except (OSError, TidalError) as exc:
            log.warning("could not write stats to %s: %s", self.path, exc)

    def write_metrics(self) -> None:
        if self.metrics is None or self.metrics_path is None:
            return
        from prometheus_client import CollectorRegistry, write_to_textfile

        if self._registry is None:
            self._registry = CollectorRegistry()
            self._registry.register(self.metrics)
        try:
            write_to_textfile(str(self.metrics_path), self._registry)  # tmp + rename
        except OSError as exc:
            log.warning("could not write metrics to %s: %s", self.metrics_path, exc)

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.write()
            self.write_metrics()

    def stop(self) -> None:
        self.stopped.set()
        self.write()
        self.write_metrics()


OWNER_POLL_S = 0.5


def _watch_owner(owner: str) -> None:
    """Stop serving (as SIGTERM does) once the owner process is gone: a build's server must not
    outlive the build. A poll, since the server runs in its own session (no parent-death
    signal reaches it across ``setsid``) and pidfds cannot be waited on by threads portably."""
    from tidal.blockdev.mounts import process_identity

    pid = int(owner.partition(":")[0])

    def watch() -> None:
        while process_identity(pid) == owner:
            time.sleep(OWNER_POLL_S)
        log.warning("owner %s of this mount is gone; stopping", owner)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidal.blockdev.serve", description=__doc__)
    parser.add_argument("image", type=Path, help="image directory (holds manifest.json)")
    parser.add_argument("mountpoint", type=Path, help="directory where <mountpoint>/disk appears")
    parser.add_argument("--writable", type=Path, help="writable layer directory (read-write)")
    parser.add_argument("--ready-fd", type=int, help="file descriptor to report readiness on")
    parser.add_argument("--max-io-bytes", type=int, default=1 << 20)
    parser.add_argument("--stats-file", type=Path, help="write I/O and fetch statistics here")
    parser.add_argument("--trace-out", type=Path, help="record the ranges read into this trace")
    parser.add_argument(
        "--warm-page-cache",
        action="store_true",
        help="push the image's trace into the disk's page cache (its loop device reads buffered)",
    )
    parser.add_argument(
        "--owner", help="PID:START of the process this mount serves: exit when it is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TIDAL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    ready = _ReadyPipe(args.ready_fd)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        served = open_device(args.image, args.writable)
    except TidalError as exc:
        ready.send(f"error: {exc}")
        return 1
    device: BlockDevice = served.device
    recorder = TraceRecorder(device) if args.trace_out is not None else None
    try:
        disk = FuseDisk.mount(
            recorder or device, args.mountpoint, name=str(args.image),
            max_io_bytes=args.max_io_bytes,
        )  # fmt: skip
    except TidalError as exc:
        log.error("FUSE server for %s could not mount: %s", args.image, exc)
        ready.send(f"error: FUSE mount at {args.mountpoint} failed: {exc}")
        served.close()
        return 1
    log.info(
        "serving %s%s at %s/disk (%d bytes)",
        args.image,
        f" + writable {args.writable}" if args.writable else " read-only",
        args.mountpoint,
        device.size_bytes,
    )
    metrics = MountMetrics(disk, served, str(args.image))
    p2p = served.lazy.p2p if served.lazy is not None else None
    if p2p is not None:  # its peer server's /metrics shows the mount's figures too
        p2p.server.service.add_collector(metrics)
    stats = (
        StatsWriter(
            args.stats_file,
            disk,
            served,
            STATS_INTERVAL_S,
            metrics,
            args.stats_file.with_name(METRICS_FILE),
        )
        if args.stats_file is not None
        else None
    )
    if stats is not None:
        stats.write()  # before "ready": `tidal image stats` right after the mount has figures
        stats.start()
    if args.owner:
        _watch_owner(args.owner)
    if args.warm_page_cache and recorder is None:
        served.warm(disk)
    ready.send("ready")
    try:
        while not stop.is_set() and not disk.wait(0.2):
            pass  # served until unmounted (the threads see the connection end) or signalled
        if stop.is_set():
            log.info("FUSE server for %s stopping on a signal", args.image)
            try:  # a loop device still on the disk keeps it busy: do not wait long for it
                disk.close(unmount=True, busy_timeout_s=STOP_BUSY_TIMEOUT_S)
            except TidalError as exc:  # busy (a loop device still holds it): leave it
                log.warning("could not unmount %s on stop: %s", args.mountpoint, exc)
                disk.close(unmount=False)
        else:
            disk.close(unmount=False)
    finally:
        if stats is not None:
            stats.stop()
        if recorder is not None:
            with contextlib.suppress(OSError):
                trace = recorder.trace()
                write_bytes_atomic(args.trace_out, trace.serialize())
                log.info("recorded %d ranges (%d bytes) to %s", len(trace.ranges),
                         trace.total_bytes, args.trace_out)  # fmt: skip
        served.close()
        log.info(
            "stopped %s: %d reads (%d bytes), %d writes (%d bytes), %d errors",
            args.image,
            disk.counters.reads,
            disk.counters.bytes_read,
            disk.counters.writes,
            disk.counters.bytes_written,
            disk.counters.errors,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
