"""HTTP service kit: Starlette + uvicorn against Tidal's small core on http.server.

What a Tidal service pays for its HTTP layer, measured for each candidate, rows interleaved
round-robin in one run:

  * **import + start-up**: a fresh interpreter imports the framework, builds an app with one
    JSON route and serves it from a thread (as a FUSE server's P2P peer does); timed inside
    the process from its first line to the listening socket, and from the parent's spawn to
    the first answer (interpreter start included);
  * **per-request latency**: p50/p99 of ``GET /v1/ping`` (a small JSON body) over one
    keep-alive httpx client, the server in its own process.

Both load prometheus-client late (the kit at its first request, which counts requests; the
Starlette app at its first ``/metrics``), so start-up compares the HTTP layers alone.

Candidates: ``tidal.service`` (route table on ``http.server``) on TCP and on a unix socket;
Starlette + uvicorn on TCP with an async handler, and on TCP and a unix socket with a plain
(blocking) handler, which Starlette runs in its thread pool — what Tidal's handlers (runc,
cgroupfs, chunk reads) would be. The baseline row is the interpreter alone (``python -c pass``).

Usage: .venv/bin/python benchmarks/bench_http.py [--rounds 8] [--requests 1500]
Needs ``pip install starlette uvicorn`` in the venv for the Starlette rows (skipped with a
note otherwise). Writes benchmarks/results/http.json.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the child's first line: import cost starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "http.json"
PY = sys.executable

VARIANTS = {
    "tidal.service (http.server), TCP": ("kit", "tcp"),
    "tidal.service (http.server), unix socket": ("kit", "unix"),
    "Starlette + uvicorn, async handler, TCP": ("starlette-async", "tcp"),
    "Starlette + uvicorn, blocking handler, TCP": ("starlette-sync", "tcp"),
    "Starlette + uvicorn, blocking handler, unix socket": ("starlette-sync", "unix"),
}


# --- the child: one server ---------------------------------------------------------------------


def _child(kind: str, where: str) -> None:
    if kind == "kit":
        from tidal.service.server import Route, Service, TcpServiceServer, UnixServiceServer

        service = Service("bench", [Route("GET", "/v1/ping", lambda req: {"ok": True})])
        server: Any = (
            UnixServiceServer(where, service)
            if where.startswith("/")
            else TcpServiceServer("127.0.0.1", 0, service)
        )
        t_import = time.perf_counter()
        server.start()
        port = 0 if where.startswith("/") else server.port()
    else:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route as SRoute

        def metrics(request: Any) -> Response:
            # every Tidal service serves /metrics; like the kit, load prometheus-client late
            import prometheus_client

            return Response(prometheus_client.generate_latest(prometheus_client.REGISTRY))

        async def ping_async(request: Any) -> JSONResponse:
            return JSONResponse({"ok": True})

        def ping_sync(request: Any) -> JSONResponse:
            return JSONResponse({"ok": True})

        handler = ping_async if kind == "starlette-async" else ping_sync
        app = Starlette(routes=[SRoute("/v1/ping", handler), SRoute("/metrics", metrics)])
        t_import = time.perf_counter()
        if where.startswith("/"):
            config = uvicorn.Config(app, uds=where, log_level="warning", lifespan="off")
        else:
            config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
            config.lifespan = "off"
        userver = uvicorn.Server(config)
        threading.Thread(target=userver.run, daemon=True).start()
        while not userver.started:
            time.sleep(0.001)
        port = 0
        if not where.startswith("/"):
            port = userver.servers[0].sockets[0].getsockname()[1]
    t_ready = time.perf_counter()
    print(json.dumps({"import_ms": 1000 * (t_import - T0), "ready_ms": 1000 * (t_ready - T0),
                      "port": port}), flush=True)  # fmt: skip
    sys.stdin.read()  # serve until the parent closes our stdin


# --- the parent ----------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _one(kind: str, transport: str, tmp: Path, requests: int) -> dict[str, Any]:
    import httpx

    sock = str(tmp / f"{kind}.sock")
    if transport == "unix" and os.path.exists(sock):
        os.unlink(sock)
    where = sock if transport == "unix" else "tcp"
    t_spawn = time.perf_counter()
    proc = subprocess.Popen(
        [PY, __file__, "--child", kind, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        if transport == "unix":
            client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://x")
        else:
            client = httpx.Client(base_url=f"http://127.0.0.1:{info['port']}")
        with client:
            first = client.get("/v1/ping")
            first_answer_ms = 1000 * (time.perf_counter() - t_spawn)
            assert first.json() == {"ok": True}, first.text
            lat = []
            for i in range(requests + 100):
                t = time.perf_counter()
                r = client.get("/v1/ping")
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise SystemExit(f"{kind}: HTTP {r.status_code}")
                if i >= 100:  # warm-up
                    lat.append(1000 * dt)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    return {
        "import_ms": info["import_ms"],
        "ready_ms": info["ready_ms"],
        "first_answer_ms": first_answer_ms,
        "latency_ms": lat,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    variants = dict(VARIANTS)
    skipped = None
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        variants = {k: v for k, v in variants.items() if v[0] == "kit"}
        skipped = "Starlette rows: pip install starlette uvicorn into the venv"
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    interp: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tidal-bench-http-") as tmp:
        for _ in range(args.rounds):
            t = time.perf_counter()
            subprocess.run([PY, "-c", "pass"], check=True)
            interp.append(1000 * (time.perf_counter() - t))
            for name, (kind, transport) in variants.items():
                samples[name].append(_one(kind, transport, Path(tmp), args.requests))
    rows = []
    for name, runs in samples.items():
        lat = [x for r in runs for x in r["latency_ms"]]
        rows.append(
            {
                "server": name,
                "rounds": len(runs),
                "import_ms_p50": statistics.median(r["import_ms"] for r in runs),
                "startup_ms_p50": statistics.median(r["ready_ms"] for r in runs),
                "spawn_to_first_answer_ms_p50": statistics.median(
                    r["first_answer_ms"] for r in runs
                ),
                "requests": len(lat),
                "request_p50_ms": _pct(lat, 0.50),
                "request_p99_ms": _pct(lat, 0.99),
            }
        )
    baseline = statistics.median(interp)
    doc = {
        "benchmark": "http_service_kit",
        "baseline": {"python -c pass (interpreter) ms p50": baseline},
        "rows": rows,
        "skipped": skipped,
        "load_average": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'server':52s} {'import':>7s} {'start':>7s} {'1st ans':>8s} {'p50':>7s} {'p99':>7s}")
    print(f"{'python -c pass (baseline)':52s} {'':>7s} {'':>7s} {baseline:8.1f}")
    for r in rows:
        print(
            f"{r['server']:52s} {r['import_ms_p50']:7.1f} {r['startup_ms_p50']:7.1f} "
            f"{r['spawn_to_first_answer_ms_p50']:8.1f} {r['request_p50_ms']:7.3f} "
            f"{r['request_p99_ms']:7.3f}"
        )
    print("(ms; import and start measured in the server process from its first line)")
    if skipped:
        print(f"skipped: {skipped}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
