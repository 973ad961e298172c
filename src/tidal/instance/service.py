"""The instance API under ``/v1/instances``, served by the engine daemon's own process.

:func:`instance_part` is a :class:`~tidal.engine.daemon.DaemonPart` factory: ``tidal daemon``
composes it into the engine daemon (one socket, one process, one reconciliation on start), so
the engine never imports this part. Requests map one-to-one onto :class:`InstanceManager`;
errors answer with the service kit's table, so :class:`~tidal.instance.client.InstanceClient`
re-raises the same class. A background thread removes ``--rm`` instances whose main
container has exited.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tidal.engine.containers import Engine
from tidal.engine.daemon import API_VERSION, DaemonPart
from tidal.errors import ConfigError, TidalError
from tidal.instance.catalog import InstanceSettings
from tidal.instance.manager import InstanceManager
from tidal.instance.metrics import metrics_routes
from tidal.instance.spec import InstanceSpec
from tidal.service.server import Request, Response, Route
from tidal.service.wire import error_body

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 1.0
"""How often finished ``--rm`` instances are looked for."""
BATCH_MAX_SPECS = 1000
"""The most specs one ``POST /v1/instances/batch`` takes (a larger burst: several batches)."""
BATCH_WORKERS = 4
"""Instances of one batch made at once. Each ``run`` mostly waits on ``ip``, ``mount`` and
the runtime; on 2 cores more than a few at a time only lengthens each one's latency."""


def pool_routes(manager: InstanceManager) -> list[Route]:
    """``/v1/instances/pools``: each pool's shape, target, ready and in use (GET), prewarm a
    spec's pool (POST ``{"spec": ..., "count": N}``), drain every idle member (DELETE)."""
    base = f"/{API_VERSION}/instances/pools"

    def prewarm(req: Request) -> dict[str, Any]:
        body = req.json_object()
        count = body.get("count")
        if not isinstance(count, int) or isinstance(count, bool):
            raise ConfigError(f"prewarm count must be an integer, got {count!r}")
        return manager.prewarm(InstanceSpec.from_json(body.get("spec") or {}), count)

    def wait(req: Request) -> list[dict[str, Any]]:
        raw = req.json_object().get("timeout_s", 60)
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or raw <= 0:
            raise ConfigError(f"timeout_s must be a positive number, got {raw!r}")
        manager.pools.wait_ready(float(raw))
        return manager.pools.status()

    return [
        Route("GET", base, lambda _: manager.pools.status()),
        Route("POST", base, prewarm),
        Route("POST", f"{base}/wait", wait),
        Route("DELETE", base, lambda _: {"drained": manager.pools.drain()}),
    ]


def instance_routes(manager: InstanceManager) -> list[Route]:
    base = f"/{API_VERSION}/instances"

    def create(req: Request) -> Response:
        spec = InstanceSpec.from_json(req.json_object().get("spec") or {})
        rec = manager.run(spec)
        return Response.json(manager.describe(rec), 201)

    def remove(req: Request) -> dict[str, str]:
        ref = req.params["ref"]
        manager.remove(ref, force=req.query.get("force") in ("1", "true"))
        return {"removed": ref}

    def stop(req: Request) -> dict[str, Any]:
        rec = manager.stop(req.params["ref"], req.json_object().get("timeout_s"))
        return manager.describe(rec)

    def logs(req: Request) -> Response:
        raw = req.query.get("offset", "0")
        if not raw.isdigit():
            raise ConfigError(f"query parameter offset={raw!r} is not an integer")
        chunk = manager.logs(req.params["ref"], req.query.get("container"), int(raw))
        headers = {
            "X-Tidal-Next-Offset": str(chunk.next_offset),
            "X-Tidal-Running": "1" if chunk.running else "0",
        }
        return Response(chunk.data, 200, "application/octet-stream", headers)

    def exec_(req: Request) -> dict[str, Any]:
        body = req.json_object()
        res = manager.exec(
            req.params["ref"],
            list(body.get("argv") or []),
            container=body.get("container"),
            env=list(body.get("env") or []),
            stdin=base64.b64decode(body.get("stdin_b64") or ""),
        )
        return {
            "exit_code": res.exit_code,
            "stdout_b64": base64.b64encode(res.stdout).decode(),
            "stderr_b64": base64.b64encode(res.stderr).decode(),
        }

    def capacity(req: Request) -> dict[str, Any]:
        cap, used = manager.capacity(), manager.reserved()
        return {
            "cpus": cap.cpus,
            "memory_bytes": cap.memory_bytes,
            "reserved_cpus": used.cpus,
            "reserved_memory_bytes": used.memory_bytes,
            "types": {n: lim.to_json() for n, lim in sorted(manager.catalog.types.items())},
        }

    return [
        *pool_routes(manager),  # before {ref}: "pools" is no instance
        *batch_routes(manager),
        Route("GET", f"/{API_VERSION}/node/capacity", capacity),
        Route("GET", base, lambda _: [manager.describe(r) for r in manager.list_all()]),
        Route("POST", base, create),
        Route(
            "GET", f"{base}/{{ref}}", lambda req: manager.describe(manager.get(req.params["ref"]))
        ),
        Route("DELETE", f"{base}/{{ref}}", remove),
        Route("POST", f"{base}/{{ref}}/stop", stop),
        Route("GET", f"{base}/{{ref}}/logs", logs),
        Route("POST", f"{base}/{{ref}}/exec", exec_),
    ]


def run_batch(
    manager: InstanceManager, specs: list[InstanceSpec], workers: int = BATCH_WORKERS
) -> list[dict[str, Any]]:
    """Run every spec (``workers`` at a time); one result per spec, in order: the instance
    as ``describe`` shows it, or the error in the kit's wire shape. A failed one does not stop
    the others (and, as ``run``, leaves nothing of itself)."""

    def one(spec: InstanceSpec) -> dict[str, Any]:
        try:
            return {"instance": manager.describe(manager.run(spec))}
        except TidalError as exc:
            return error_body(exc)
        except Exception as exc:  # a bug: reported for this spec, the others still run
            log.exception("instance %s of a batch failed", spec.name or "(unnamed)")
            return error_body(exc)

    if not specs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(specs)))) as pool:
        return list(pool.map(one, specs))


def parse_batch(body: dict[str, Any]) -> list[InstanceSpec]:
    """The specs of a batch request; bad input is one line naming the entry at fault (and
    nothing is run: a batch is parsed whole before its first instance)."""
    raw = body.get("specs")
    if not isinstance(raw, list):
        raise ConfigError('a batch needs {"specs": [spec, ...]}, a list of instance specs')
    if len(raw) > BATCH_MAX_SPECS:
        raise ConfigError(
            f"a batch takes at most {BATCH_MAX_SPECS} specs, got {len(raw)}; split it"
        )
    specs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"batch spec {i} is {type(item).__name__}, not an object")
        try:
            specs.append(InstanceSpec.from_json(item))
        except ConfigError as exc:
            raise ConfigError(f"batch spec {i}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"batch spec {i} is not an instance spec: {exc!r}") from exc
    dup = sorted(n for n, k in Counter(s.name for s in specs if s.name).items() if k > 1)
    if dup:
        raise ConfigError(f"batch names instances more than once: {', '.join(dup)}")
    return specs


def batch_routes(manager: InstanceManager) -> list[Route]:
    """``POST /v1/instances/batch``: many instances from one request (see :func:`run_batch`),
    so a client starting hundreds pays one connection and no interpreter per instance."""

    def batch(req: Request) -> Response:
        specs = parse_batch(req.json_object())
        return Response.json({"results": run_batch(manager, specs)}, 201)

    return [Route("POST", f"/{API_VERSION}/instances/batch", batch)]


def instance_part(engine: Engine, settings: InstanceSettings | None = None) -> DaemonPart:
    """The instance API on ``engine``, for :class:`~tidal.engine.daemon.Daemon`'s ``parts``
    (``settings``: default ``[instance]`` from the settings file and environment)."""
    manager = InstanceManager(engine, settings)
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(REAP_INTERVAL_S):
            try:
                manager.remove_finished()
            except TidalError as exc:
                log.warning("removing finished instances: %s", exc)

    reaper = threading.Thread(target=reap, name="tidal-instance-rm", daemon=True)

    def start() -> None:
        counts = manager.reconcile()
        log.info("instances: %s", counts or "none")
        if reaper.ident is None:  # a second reconcile does not start a second reaper
            reaper.start()
        manager.pools.start()

    def close() -> None:
        manager.pools.close()
        stop.set()
        if reaper.is_alive():
            reaper.join(timeout=10)

    routes = (*instance_routes(manager), *metrics_routes(manager))
    return DaemonPart(routes, reconcile=start, close=close)
