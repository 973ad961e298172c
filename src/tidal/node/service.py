"""The node service: one long-lived process that holds the node's images and mounts.

``tidal node serve`` runs it on a unix socket (``$TIDAL_DATA_ROOT/node.sock``); ``tidal pull``,
``tidal image mount``/``umount`` and the engine's image mounts ask it when it runs, so that no
pull and no mount pays a fresh interpreter and every mount's FUSE block device is served from
this one process (:mod:`tidal.node.mounts`). :class:`NodeService` is the same verbs in-process
(tests, benchmarks); :class:`~tidal.node.client.NodeClient` speaks them over the socket.

On start the service resumes the mounts a previous service left suspended (their FUSE
connections wait in the fd store), then serves. On SIGTERM it stops serving and leaves every
mount in place, suspended: an upgrade is a stop and a start, and a reader sees a pause.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tidal.blockdev import mounts as blockdev_mounts
from tidal.blockdev.fdstore import FdStore
from tidal.blockdev.mounts import MountInfo
from tidal.errors import ConfigError, DaemonUnavailableError, MountError
from tidal.node.client import socket_path
from tidal.node.images import ImageStore, StoredImage
from tidal.node.mounts import NodeServing
from tidal.service.server import (
    MetricsListener,
    Request,
    Response,
    Route,
    Service,
    UnixServiceServer,
)

log = logging.getLogger(__name__)

API = "/v1/node"


def image_json(image: StoredImage, store: ImageStore) -> dict[str, Any]:
    return {
        "reference": image.reference,
        "manifest_digest": image.manifest_digest,
        "path": str(image.path),
        "layers": len(image.layers),
        "stored_bytes": image.stored_bytes,
        "fetched_bytes": store.fetched_bytes(image),
    }


class NodeService:
    """Images and mounts of this node, served from this process (see the module docstring)."""

    def __init__(self, *, fdstore: FdStore | None = None, images: ImageStore | None = None) -> None:
        self.images = images or ImageStore()
        self.fdstore = fdstore
        self.serving = NodeServing(fdstore)

    def start(self) -> dict[str, list[str]]:
        """Resume what a previous service left suspended."""
        return self.serving.resume_all()

    def close(self) -> None:
        """Stop serving; mounts stay, suspended until the next service resumes them."""
        self.serving.close()

    # --- images ---------------------------------------------------------------------------

    def pull(self, reference: str) -> StoredImage:
        return self.images.pull(reference)

    def remove(self, reference: str, *, force: bool = False) -> None:
        image = self.images.get(reference)
        users = [m.target for m in blockdev_mounts.list_mounts() if m.image_dir == str(image.path)]
        self.images.remove(reference, users=users, force=force)

    # --- mounts ---------------------------------------------------------------------------

    def image_dir(self, image: str, pull: str = "missing") -> Path:
        """``image`` as a directory: itself if it is one, else a reference in the image store."""
        path = Path(image)
        if path.is_dir():
            return path.resolve()
        return self.images.resolve(image, pull).path

    def mount(
        self, image: str, target: str, *, writable_dir: str | None = None, pull: str = "missing"
    ) -> MountInfo:
        return blockdev_mounts.mount_image(
            self.image_dir(image, pull), target, writable_dir=writable_dir, serving=self.serving
        )

    def unmount(self, target: str, *, force: bool = False) -> None:
        blockdev_mounts.unmount(target, force=force, serving=self.serving)

    def mounts(self) -> list[MountInfo]:
        return blockdev_mounts.list_mounts()


def node_routes(node: NodeService) -> list[Route]:
    def pull(req: Request) -> Response:
        ref = str(req.json_object().get("reference") or "")
        if not ref:
            raise ConfigError("a pull needs a reference")
        return Response.json(image_json(node.pull(ref), node.images), 201)

    def remove(req: Request) -> dict[str, str]:
        body = req.json_object()
        node.remove(str(body.get("reference") or ""), force=bool(body.get("force")))
        return {"removed": str(body.get("reference"))}

    def mount(req: Request) -> Response:
        body = req.json_object()
        image, target = body.get("image"), body.get("target")
        if not isinstance(image, str) or not isinstance(target, str):
            raise ConfigError("a mount needs an image (directory or reference) and a target")
        info = node.mount(
            image,
            target,
            writable_dir=body.get("writable_dir"),
            pull=str(body.get("pull") or "missing"),
        )
        return Response.json(asdict(info), 201)

    def unmount(req: Request) -> dict[str, str]:
        body = req.json_object()
        target = str(body.get("target") or "")
        node.unmount(target, force=bool(body.get("force")))
        return {"unmounted": target}

    return [
        Route("GET", f"{API}/images", lambda _: [image_json(i, node.images) for i in node.images.list()]),
        Route("POST", f"{API}/images", pull),
        Route("POST", f"{API}/images/remove", remove),
        Route("GET", f"{API}/mounts", lambda _: [asdict(m) for m in node.mounts()]),
        Route("POST", f"{API}/mounts", mount),
        Route("POST", f"{API}/mounts/unmount", unmount),
        Route("GET", f"{API}/status", lambda _: {
            "pid": os.getpid(),
            "serving": node.serving.mounted(),
            "fdstore": str(node.fdstore.socket_path) if node.fdstore is not None else None,
        }),
    ]  # fmt: skip


class NodeDaemon:
    """``tidal node serve``: the service on its socket, one per node (an flock says so)."""

    def __init__(
        self, path: Path | None = None, *, fdstore: Path | None = None, metrics_listen: str = ""
    ) -> None:
        """``metrics_listen``: also serve ``/metrics`` on this TCP ``HOST:PORT`` (``[node]
        metrics_listen``, ``tidal node serve --metrics-listen``)."""
        self.metrics_listen = metrics_listen
        self.metrics_server: MetricsListener | None = None
        self.socket_path = path or socket_path()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = (self.socket_path.parent / "node.lock").open("a")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise DaemonUnavailableError(
                f"another node service runs for {self.socket_path.parent} (node.lock is held)"
            ) from None
        self.node = NodeService(fdstore=FdStore.ensure(fdstore or blockdev_mounts.fdstore_path()))
        self.service = Service("the node service", node_routes(self.node), error=MountError)
        self._server: UnixServiceServer | None = None
        self._stop = threading.Event()
        self.on_start: list[Callable[[], object]] = []
        """Run after the service resumed its mounts and listens (parts served from this
        process: the containerd snapshotter, ``tidal node serve --snapshotter-socket``)."""
        self.on_close: list[Callable[[], object]] = []
        """Run first at close, newest first."""

    def start(self) -> dict[str, list[str]]:
        done = self.node.start()
        log.info(
            "node service: %d mounts resumed, %d lost", len(done["resumed"]), len(done["lost"])
        )
        if self.socket_path.exists():  # the lock says no service runs: a stale socket
            self.socket_path.unlink()
        self._server = UnixServiceServer(str(self.socket_path), self.service)
        os.chmod(self.socket_path, 0o660)
        if self.metrics_listen:
            self.metrics_server = MetricsListener(self.metrics_listen, self.service)
            self.metrics_server.start()
        threading.Thread(
            target=self._server.serve_forever, name="tidal-node-api", daemon=True
        ).start()
        for start in self.on_start:
            start()
        return done

    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            self._stop.wait()
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        for close in reversed(self.on_close):
            close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.node.close()
        self._lock_fh.close()
