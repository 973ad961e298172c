"""``tidal daemon``: the engine served as a small HTTP/JSON API on a unix socket.

The API is documented in docs/engine-api.md. Requests map one-to-one onto :class:`Engine`
methods (:func:`engine_service`, on the service kit); errors answer with the kit's status
table and error shape (:mod:`tidal.service.wire`) and carry the Tidal error class name, so
the client re-raises the same type. ``/healthz`` and ``/metrics`` (containers by state,
starts and stops, start latency) come with the kit. Containers never depend on the
daemon process: stopping or SIGKILLing it leaves them running under their monitors, and the
next daemon finds them through the state database (:meth:`Daemon.reconcile`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from tidal.engine.containers import Engine
from tidal.engine.settings import EngineSettings, load_settings
from tidal.engine.spec import ContainerSpec
from tidal.errors import ConfigError, EngineError, TidalError
from tidal.service.server import (
    MetricsListener,
    Request,
    Response,
    Route,
    Service,
    UnixServiceServer,
)
from tidal.service.wire import status_for

__all__ = [
    "API_VERSION",
    "Daemon",
    "DaemonPart",
    "EngineMetrics",
    "engine_service",
    "status_for",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
API_VERSION = "v1"
LXCFS_CHECK_INTERVAL_S = 5.0

START_SECONDS_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0)
"""Container start latency: ~90 ms on a held image, ~200 ms mounting one, seconds pulling."""


class EngineMetrics:
    """The daemon's Prometheus figures, kept around the :class:`Engine` calls it makes:
    containers by state (read from the engine when scraped), starts and stops by result,
    and the start latency."""

    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.starts = Counter(
            "tidal_engine_container_starts",
            "Container starts (run or start) by result",
            ["result"],
            registry=registry,
        )
        self.stops = Counter(
            "tidal_engine_container_stops",
            "Container stops (stop or kill) by how and result",
            ["how", "result"],
            registry=registry,
        )
        self.start_seconds = Histogram(
            "tidal_engine_container_start_seconds",
            "Time from the start request to a running container",
            buckets=START_SECONDS_BUCKETS,
            registry=registry,
        )
        for result in ("ok", "error"):  # every series exists from the start (rate() needs it)
            self.starts.labels(result)
            for how in ("stop", "kill"):
                self.stops.labels(how, result)
        registry.register(self)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts: dict[str, int] = {}
        for rec in self.engine.list_all():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        family = GaugeMetricFamily(
            "tidal_engine_containers", "Containers known to the engine, by state", labels=["state"]
        )
        for state, n in sorted(counts.items()):
            family.add_metric([state], n)
        yield family

    def started(self, call: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            result = call()
        except BaseException:
            self.starts.labels("error").inc()
            raise
        self.start_seconds.observe(time.perf_counter() - t0)
        self.starts.labels("ok").inc()
        return result

    def stopped(self, how: str, call: Callable[[], T]) -> T:
        try:
            result = call()
        except BaseException:
            self.stops.labels(how, "error").inc()
            raise
        self.stops.labels(how, "ok").inc()
        return result


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name) in ("1", "true")


def _int(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    try:
        return default if raw is None else int(raw)
    except ValueError:
        raise ConfigError(f"query parameter {name}={raw!r} is not an integer") from None


def engine_service(engine: Engine) -> Service:
    """The API table: (method, path) -> one :class:`Engine` call (docs/engine-api.md)."""
    service = Service("the engine daemon", [], error=EngineError)
    metrics = EngineMetrics(engine, service.registry)
    v = f"/{API_VERSION}"
    c = f"{v}/containers"

    def ping(req: Request) -> dict[str, Any]:
        return {"ok": True, "api": API_VERSION, "pid": os.getpid()}

    def create(req: Request) -> Response:
        body = req.json_object()
        spec = ContainerSpec.from_json(body.get("spec") or {})
        if body.get("start", True):
            rec = metrics.started(lambda: engine.run(spec))
        else:
            rec = engine.create(spec)
        return Response.json(rec.to_json(), 201)

    def remove(req: Request) -> dict[str, str]:
        ref = req.params["ref"]
        engine.remove(ref, force=_flag(req.query, "force"))
        return {"removed": ref}

    def logs(req: Request) -> Response:
        tail = _int(req.query, "tail", 0) if "tail" in req.query else None
        if tail is not None and tail < 0:
            raise ConfigError(f"query parameter tail={tail} must be 0 or more lines")
        chunk = engine.logs(req.params["ref"], _int(req.query, "offset", 0), tail_lines=tail)
        headers = {
            "X-Tidal-Next-Offset": str(chunk.next_offset),
            "X-Tidal-Running": "1" if chunk.running else "0",
        }
        return Response(chunk.data, 200, "application/octet-stream", headers)

    def start(req: Request) -> Any:
        return metrics.started(lambda: engine.start(req.params["ref"])).to_json()

    def stop(req: Request) -> Any:
        timeout_s = req.json_object().get("timeout_s")
        return metrics.stopped("stop", lambda: engine.stop(req.params["ref"], timeout_s)).to_json()

    def kill(req: Request) -> Any:
        sig = str(req.json_object().get("signal", "KILL"))
        return metrics.stopped("kill", lambda: engine.kill(req.params["ref"], sig)).to_json()

    def wait(req: Request) -> Any:
        return engine.wait(req.params["ref"], req.json_object().get("timeout_s")).to_json()

    def exec_(req: Request) -> dict[str, Any]:
        body = req.json_object()
        res = engine.exec(
            req.params["ref"],
            list(body.get("argv") or []),
            env=list(body.get("env") or []),
            stdin=base64.b64decode(body.get("stdin_b64") or ""),
        )
        return {
            "exit_code": res.exit_code,
            "stdout_b64": base64.b64encode(res.stdout).decode(),
            "stderr_b64": base64.b64encode(res.stderr).decode(),
        }

    def update(req: Request) -> Any:
        body = req.json_object()
        rec = engine.update(
            req.params["ref"],
            cpus=body.get("cpus"),
            memory_bytes=body.get("memory_bytes"),
            pids_limit=body.get("pids_limit"),
        )
        return rec.to_json()

    def upgrade(req: Request) -> Any:
        body = req.json_object()
        if "image" not in body:
            raise ConfigError('upgrade needs {"image": PATH}')
        cmd = body.get("command")
        timeout_s = body.get("timeout_s")
        if timeout_s is not None and (not isinstance(timeout_s, int | float) or timeout_s < 0):
            raise ConfigError(f"upgrade timeout {timeout_s!r}: give seconds, 0 or more")
        rec = engine.upgrade(
            req.params["ref"],
            str(body["image"]),
            tuple(cmd) if cmd else None,
            stop_timeout_s=timeout_s,
        )
        return rec.to_json()

    service.routes[:0] = [
        Route("GET", f"{v}/ping", ping),
        Route("GET", c, lambda _: [engine.describe(r) for r in engine.list_all()]),
        Route("POST", c, create),
        Route("GET", f"{c}/{{ref}}", lambda req: engine.inspect(req.params["ref"])),
        Route("DELETE", f"{c}/{{ref}}", remove),
        Route("GET", f"{c}/{{ref}}/logs", logs),
        Route("POST", f"{c}/{{ref}}/start", start),
        Route("POST", f"{c}/{{ref}}/stop", stop),
        Route("POST", f"{c}/{{ref}}/kill", kill),
        Route("POST", f"{c}/{{ref}}/wait", wait),
        Route("POST", f"{c}/{{ref}}/exec", exec_),
        Route("POST", f"{c}/{{ref}}/update", update),
        Route("POST", f"{c}/{{ref}}/upgrade", upgrade),
    ]
    return service


@dataclass(frozen=True)
class DaemonPart:
    """Another part served by the same daemon process on the engine (the instance API): its
    routes, what it does once the engine has reconciled, and at close. The engine never
    imports such a part; the entry point (``tidal daemon``) composes them."""

    routes: tuple[Route, ...]
    reconcile: Callable[[], object] = lambda: None
    close: Callable[[], object] = lambda: None


PartFactory = Callable[[Engine], DaemonPart]


class Daemon:
    """Owns the engine, the socket, the single-instance lock and the lxcfs watchdog."""

    def __init__(
        self, settings: EngineSettings | None = None, *, parts: Sequence[PartFactory] = ()
    ) -> None:
        """``parts``: other parts' APIs on this engine, served from the same socket."""
        self.settings = settings or load_settings()
        self.socket_path = self.settings.resolved_socket_path()
        state_dir = self.settings.resolved_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(state_dir / "daemon.lock", "w")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise EngineError(
                f"another tidal daemon already owns {state_dir}; stop it first"
            ) from None
        self.engine = Engine(self.settings)
        self.service = engine_service(self.engine)
        """Routes, ``/healthz``, ``/metrics``: usable without the socket (tests)."""
        self.parts = [make(self.engine) for make in parts]
        for part in self.parts:
            self.service.routes[:0] = list(part.routes)
        self._stop = threading.Event()
        self._server: UnixServiceServer | None = None
        self.metrics_server: MetricsListener | None = None
        """``[engine] metrics_listen``: the metrics on TCP, once started."""
        self._threads: list[threading.Thread] = []

    def reconcile(self) -> dict[str, int]:
        """Fold in exits and starts that happened while no daemon ran; count by status."""
        counts = self.engine.reconcile()
        if self.engine.lxcfs.mounted():
            with contextlib.suppress(TidalError):
                self.engine.lxcfs.ensure()
        for part in self.parts:
            part.reconcile()
        return counts

    def _bind(self) -> UnixServiceServer:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # The lock says no daemon runs, so a socket file is stale.
            path.unlink()
        server = UnixServiceServer(str(path), self.service)
        os.chmod(path, 0o660)
        return server

    def _watch_lxcfs(self) -> None:
        """lxcfs's watchdog; on the same beat, hot image mounts idle for too long go."""
        while not self._stop.wait(LXCFS_CHECK_INTERVAL_S):
            try:
                self.engine.storage.trim_hot_images()
            except TidalError as exc:
                log.error("releasing idle image mounts: %s", exc)
            if self.engine.lxcfs.mounted() or self.engine.lxcfs.pid():
                try:
                    self.engine.lxcfs.ensure()
                except TidalError as exc:
                    log.error("lxcfs watchdog: %s", exc)

    def start(self) -> None:
        """Reconcile, bind and serve in background threads (tests); see :meth:`serve_forever`."""
        counts = self.reconcile()
        log.info("engine state: %s", counts or "no containers")
        self._server = self._bind()
        if self.settings.metrics_listen:
            self.metrics_server = MetricsListener(self.settings.metrics_listen, self.service)
            self.metrics_server.start()
            log.info("metrics on %s", self.metrics_server.url)
        t = threading.Thread(target=self._server.serve_forever, name="tidal-api", daemon=True)
        t.start()
        w = threading.Thread(target=self._watch_lxcfs, name="tidal-lxcfs-watch", daemon=True)
        w.start()
        self._threads = [t, w]

    def serve_forever(self) -> None:
        self.start()
        try:
            self._stop.wait()
        finally:
            self.close()

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop serving. Containers keep running; lxcfs keeps serving them."""
        self._stop.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._threads:
            t.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        for part in self.parts:
            part.close()
        self.engine.close()
        self._lock_fh.close()
