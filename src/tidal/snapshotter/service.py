"""containerd's snapshots gRPC API on a unix socket, over :class:`~.snapshotter.Snapshotter`.

A thin adapter: requests become calls, :class:`Snapshot` values become ``Info`` messages, and
Tidal's snapshot errors become the status codes containerd's ``errdefs.FromGRPC`` maps back
(NOT_FOUND -> ErrNotFound, ALREADY_EXISTS -> ErrAlreadyExists, FAILED_PRECONDITION,
INVALID_ARGUMENT); containerd's unpacker relies on ALREADY_EXISTS to skip a download.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from tidal.errors import (
    ConfigError,
    RetryableError,
    SnapshotArgumentError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
    TidalError,
)
from tidal.service.client import socket_reachable
from tidal.snapshotter.backend import ImageBackend
from tidal.snapshotter.model import Mount, Snapshot
from tidal.snapshotter.snapshotter import Snapshotter

try:
    from tidal.snapshotter._proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the build
    if not (exc.name or "").startswith("tidal.snapshotter._proto"):
        raise
    raise SnapshotError(
        "the snapshots API's Python stubs are not generated; run `make deps` (or "
        "`python -m tidal.snapshotter.protogen`, which needs the Debian package "
        "golang-github-containerd-containerd-dev)"
    ) from None

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SnapshotNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SnapshotExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (SnapshotStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (RetryableError, grpc.StatusCode.UNAVAILABLE),
)
"""Tidal error -> gRPC status, most specific first; anything else is UNKNOWN."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_message(snap: Snapshot) -> Any:
    return snapshots_pb2.Info(
        name=snap.key,
        parent=snap.parent,
        kind=snapshots_pb2.Kind.Name(int(snap.kind)),
        created_at=_timestamp(snap.created_ns),
        updated_at=_timestamp(snap.updated_ns),
        labels=dict(snap.labels),
    )


def mount_messages(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):  # type: ignore[misc]
    """The ``containerd.services.snapshots.v1.Snapshots`` service."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TidalError as exc:
            code = status_of(exc)
            level = logging.DEBUG if code != grpc.StatusCode.UNKNOWN else logging.ERROR
            log.log(level, "%s: %s (%s)", what, exc, code.name)
            context.abort(code, str(exc))
            raise  # not reached: abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(
            context,
            f"Prepare {request.key}",
            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mount_messages(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(
            context,
            f"View {request.key}",
            lambda: self.sn.view(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=mount_messages(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"Mounts {request.key}", lambda: self.sn.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=mount_messages(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(
            context,
            f"Commit {request.key} as {request.name}",
            lambda: self.sn.commit(request.name, request.key, dict(request.labels)),
        )
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, f"Remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        snap = self._call(context, f"Stat {request.key}", lambda: self.sn.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_message(snap))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self._call(
            context,
            f"Update {request.info.name}",
            lambda: self.sn.update(request.info.name, dict(request.info.labels), paths),
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=info_message(snap))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        snaps = self._call(context, "List", lambda: self.sn.walk(list(request.filters)))
        batch = 100  # as containerd's own service: several Info per message
        for i in range(0, len(snaps), batch):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[info_message(s) for s in snaps[i : i + batch]]
            )

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self._call(
            context, f"Usage {request.key}", lambda: self.sn.usage(request.key)
        )
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        removed = self._call(context, "Cleanup", self.sn.cleanup)
        if removed:
            log.info("cleanup removed %d orphan snapshot director(ies)", len(removed))
        return empty_pb2.Empty()


# --- the server ----------------------------------------------------------------------------


SOCKET_PATH_MAX_BYTES = 107
"""``sun_path`` holds 108 bytes with the terminating NUL."""


def _check_paths(socket_path: Path, root: Path) -> None:
    """One line naming the bad path, before anything is created."""
    size = len(os.fsencode(socket_path))
    if size > SOCKET_PATH_MAX_BYTES:
        raise ConfigError(
            f"--socket {socket_path} is {size} bytes; a unix socket path holds at most "
            f"{SOCKET_PATH_MAX_BYTES}: choose a shorter one"
        )
    for what, path in (("--root", root), ("--socket's directory", socket_path.parent)):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {path} is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot create it ({exc.strerror})") from None


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another snapshotter serves root {root} (it holds {root / 'lock'}); stop it or "
                "choose another --root"
            ) from None
        yield
    finally:
        os.close(fd)


class SnapshotterServer:
    """The gRPC server on ``socket_path`` for a :class:`Snapshotter` on ``root``."""

    def __init__(
        self,
        socket_path: Path,
        root: Path,
        backend: ImageBackend | None = None,
        *,
        workers: int = 8,
    ) -> None:
        self.socket_path = socket_path.resolve()
        self.root = root.resolve()
        self.backend = backend
        self.workers = workers
        self.snapshotter: Snapshotter | None = None
        self._server: grpc.Server | None = None
        self._stack = contextlib.ExitStack()

    def start(self) -> SnapshotterServer:
        _check_paths(self.socket_path, self.root)
        self._stack.enter_context(_root_lock(self.root))
        try:
            if self.socket_path.exists():
                if socket_reachable(self.socket_path):
                    raise ConfigError(
                        f"{self.socket_path} is in use by another server; stop it or choose "
                        "another --socket"
                    )
                self.socket_path.unlink()
            sn = Snapshotter(self.root, self.backend)
            self._stack.callback(sn.close)
            self.snapshotter = sn
            remounted = sn.reconcile()
            if remounted:
                log.warning("reconciled: remounted %d snapshot(s)", len(remounted))
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers))
            snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn), server)
            try:
                bound = server.add_insecure_port(f"unix:{self.socket_path}")
            except RuntimeError:
                bound = 0
            if bound == 0:
                server.stop(None)
                raise ConfigError(f"cannot listen on {self.socket_path} (gRPC could not bind it)")
            server.start()
            os.chmod(self.socket_path, 0o600)
            self._server = server
        except BaseException:
            self._stack.close()
            raise
        log.info("serving containerd's snapshots API on %s (root %s)", self.socket_path, self.root)
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving; mounts stay (running containers use them; the next start adopts them)."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        self._stack.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> SnapshotterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (``on_ready`` runs once the socket listens)."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        with self:
            if on_ready is not None:
                on_ready()
            done.wait()
