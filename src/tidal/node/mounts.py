"""The node service's mounts: every image's FUSE block device served from this one process.

:class:`NodeServing` is the :class:`~tidal.blockdev.mounts.FuseServing` the node service hands
to :func:`~tidal.blockdev.mounts.mount_image`: instead of a server process per mount it opens
the image's device here and serves ``<fuse_dir>/disk`` with a
:class:`~tidal.blockdev.fuse_ll.FuseDisk` (threads of this process), so a mount costs no
interpreter start. Each connection's ``/dev/fuse`` descriptor is also handed to the fd store
(:mod:`tidal.blockdev.fdstore`, a holder process that does nothing else) under the mount's
name, which is what lets a mount outlive the service: when the service dies (a crash, SIGKILL,
an upgrade), the kernel keeps the connection because the holder keeps it open; the requests in
flight wait; the next service takes the descriptor back (:meth:`NodeServing.resume_all`), the
kernel resends what was pending, and a container sees a pause, not EIO.

The loop device and the ext4 mount above the FUSE disk are the kernel's and need nothing from
the service; records stay in ``$TIDAL_DATA_ROOT/mounts/`` as for every mount (intent before
the act), so ``tidal image mounts``, ``umount --force`` and gc keep working and see a
node-served mount as *suspended* while its service is down.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from tidal.blockdev import mounts as blockdev_mounts
from tidal.blockdev.fdstore import FdStore
from tidal.blockdev.fuse_ll import FuseDisk
from tidal.blockdev.mounts import STATS_FILE, MountInfo, ServeRequest, ServerRef
from tidal.blockdev.serve import (
    METRICS_FILE,
    STATS_INTERVAL_S,
    MountMetrics,
    Served,
    StatsWriter,
    open_device,
)
from tidal.errors import MountError, TidalError

log = logging.getLogger(__name__)


@dataclass
class _Mounted:
    """One mount this process serves: the device, its FUSE connection and its stats writer."""

    served: Served
    disk: FuseDisk
    stats: StatsWriter


def fd_name(run_dir: Path) -> str:
    """The name a mount's FUSE connection has in the fd store (its run directory's key)."""
    return f"mount-{run_dir.name}"


class NodeServing:
    """Serves many mounts' FUSE disks from this process; see the module docstring."""

    def __init__(self, fdstore: FdStore | None, *, threads: int = 4) -> None:
        self.fdstore = fdstore
        self.threads = threads
        self._mounted: dict[str, _Mounted] = {}  # by fuse_dir
        self._lock = threading.Lock()
        self._identity = blockdev_mounts.process_identity(os.getpid())

    # --- FuseServing ----------------------------------------------------------------------

    def start(self, req: ServeRequest) -> ServerRef:
        if req.trace_out is not None or req.owner is not None:
            raise MountError(
                "the node service serves user and container mounts; recording a trace or a "
                "build's mount runs its own server (mount without the node service)"
            )
        name = fd_name(req.run_dir)
        self._serve(
            req.image_dir, req.fuse_dir, req.writable_dir, req.run_dir, name, fd=None,
            warm=req.warm_page_cache,
        )  # fmt: skip
        return ServerRef(os.getpid(), self._identity, name if self.fdstore is not None else None)

    def stop(self, info: MountInfo, *, timeout_s: float) -> None:
        with self._lock:
            mounted = self._mounted.pop(info.fuse_dir, None)
        if mounted is not None:  # teardown has unmounted the FUSE disk already
            self._close(mounted, unmount=False)
        if info.fd_name is not None and self.fdstore is not None:
            self.fdstore.drop(info.fd_name)

    # --- the service's own verbs ----------------------------------------------------------

    def mounted(self) -> list[str]:
        """The FUSE directories this process serves."""
        with self._lock:
            return sorted(self._mounted)

    def resume_all(self) -> dict[str, list[str]]:
        """Take back every suspended mount (records with an fd-store name whose server is gone).

        ``resumed``: served again from here; ``lost``: the fd store no longer had their
        connection (it was restarted, or the FUSE mount was ended): they are torn down, as
        their readers already saw the connection end.
        """
        done: dict[str, list[str]] = {"resumed": [], "lost": []}
        for info in blockdev_mounts.list_mounts():
            if info.fd_name is None or blockdev_mounts.server_alive(info):
                continue
            fd = self.fdstore.get(info.fd_name) if self.fdstore is not None else None
            if fd is None:
                log.warning("mount %s: its FUSE connection is gone; tearing it down", info.target)
                try:
                    blockdev_mounts.unmount(info.target, force=True, serving=self)
                except TidalError as exc:
                    log.warning("tearing down %s: %s", info.target, exc)
                done["lost"].append(info.target)
                continue
            try:
                self._serve(
                    Path(info.image_dir),
                    Path(info.fuse_dir),
                    Path(info.writable_dir) if info.writable_dir else None,
                    info.run_dir,
                    info.fd_name,
                    fd=fd,
                )
            except TidalError as exc:
                os.close(fd)
                log.error("could not resume the mount at %s: %s", info.target, exc)
                continue
            blockdev_mounts.save_record(
                replace(info, server_pid=os.getpid(), server_id=self._identity)
            )
            log.info("resumed the mount at %s", info.target)
            done["resumed"].append(info.target)
        return done

    def close(self) -> None:
        """Stop serving, leaving every mount in place (suspended until the next service)."""
        with self._lock:
            mounted, self._mounted = list(self._mounted.values()), {}
        for m in mounted:
            self._close(m, unmount=False)

    # --- inside ---------------------------------------------------------------------------

    def _serve(
        self,
        image_dir: Path,
        fuse_dir: Path,
        writable_dir: Path | None,
        run_dir: Path,
        name: str,
        *,
        fd: int | None,
        warm: bool = False,
    ) -> None:
        """``warm``: push the image's trace into the disk's page cache (a new mount only: a
        resumed one had its pages pushed, or its reads served, by the service before)."""
        served = open_device(image_dir, writable_dir)
        try:
            if fd is None:
                disk = FuseDisk.mount(
                    served.device, fuse_dir, name=name, fdstore=self.fdstore, threads=self.threads
                )
            else:
                disk = FuseDisk.resume(
                    served.device, fd, fuse_dir, name=name, fdstore=self.fdstore,
                    threads=self.threads,
                )  # fmt: skip
        except BaseException:
            served.close()
            raise
        if warm:
            served.warm(disk)
        metrics = MountMetrics(disk, served, str(image_dir))
        stats = StatsWriter(
            run_dir / STATS_FILE,
            disk,
            served,
            STATS_INTERVAL_S,
            metrics,
            run_dir / METRICS_FILE,
        )
        stats.write()
        stats.start()
        with self._lock:
            self._mounted[str(fuse_dir)] = _Mounted(served, disk, stats)

    @staticmethod
    def _close(mounted: _Mounted, *, unmount: bool) -> None:
        mounted.stats.stop()
        try:
            mounted.disk.close(unmount=unmount)
        except (TidalError, OSError) as exc:
            log.warning("closing the FUSE disk %s: %s", mounted.disk.mountpoint, exc)
        mounted.served.close()
