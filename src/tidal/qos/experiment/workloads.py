"""The three programs of the co-location experiment, each run as its own process.

``online``: an HTTP service on loopback that burns a fixed amount of CPU per request (measured
with the thread's CPU clock, so contention shows up as latency, not as less work).
``offline``: a CPU-bound batch job of several processes that counts units of work done.
``loadgen``: an open-loop load generator at a fixed request rate; latency is measured from the
*intended* send time, so a stalled server cannot slow the generator down and hide its own delay
(no coordinated omission). It can push a rolling p95 to the agent's API every second.

Each program first writes its own pid into the ``cgroup.procs`` files it is given, so every
thread and child it starts is born inside the experiment's cgroups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tidal.fsutil import write_json_atomic

UNIT_ITERATIONS = 20_000
"""Loop iterations per unit of offline work (about 1 ms of CPU on a 2020s core)."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (no orphaned load)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def join_cgroups(procs_files: list[str]) -> None:
    """Move this process into each listed ``cgroup.procs`` (one per v1 controller)."""
    for path in procs_files:
        Path(path).write_text(str(os.getpid()))


def burn_cpu(seconds: float) -> None:
    """Spin until this thread has consumed ``seconds`` of CPU time."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i


class _Handler(BaseHTTPRequestHandler):
    work_s = 0.01
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        burn_cpu(self.work_s)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return


class _Server(ThreadingHTTPServer):
    request_queue_size = 512
    daemon_threads = True


def run_online(port: int, work_ms: float, ready_file: str | None) -> None:
    _Handler.work_s = work_ms / 1000
    server = _Server(("127.0.0.1", port), _Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if ready_file:
        Path(ready_file).write_text(str(server.server_address[1]))
    server.serve_forever(poll_interval=0.2)
    server.server_close()


def _offline_worker(counter: Any, index: int, stop: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    done = 0
    while not stop.is_set():
        x = 0
        for i in range(UNIT_ITERATIONS):
            x += i * i
        done += 1
        counter[index] = done


def _write_atomic(path: str, doc: dict[str, Any]) -> None:
    """Readers polling the file never see it half-written."""
    write_json_atomic(path, doc, indent=None)


def run_offline(workers: int, out_file: str) -> None:
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Array("q", workers, lock=False)
    stop = ctx.Event()
    procs = [ctx.Process(target=_offline_worker, args=(counter, i, stop)) for i in range(workers)]
    for p in procs:
        p.start()
    finished = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: finished.set())
    # Report progress so the runner can plot work over time even if we are killed later.
    while not finished.wait(0.25):
        _write_atomic(out_file, {"units": sum(counter), "t": time.time()})
    stop.set()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    _write_atomic(out_file, {"units": sum(counter), "t": time.time(), "final": True})


async def _one_request(port: int, intended: float, timeout_s: float) -> float:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout_s
        )
        writer.write(b"GET / HTTP/1.0\r\nHost: online\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), timeout_s)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        return timeout_s  # a failed request counts as a timeout-long one
    return time.monotonic() - intended


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def _loadgen(
    port: int,
    rate: float,
    duration_s: float,
    report_url: str | None,
    app: str,
    timeout_s: float,
    window_s: float,
    report_every_s: float = 1.0,
) -> list[tuple[float, float]]:
    start = time.monotonic()
    results: list[tuple[float, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    recent: list[tuple[float, float]] = []

    async def fire(intended: float) -> None:
        latency = await _one_request(port, intended, timeout_s)
        item = (intended - start, latency)
        results.append(item)
        recent.append((time.monotonic(), latency))

    def report() -> None:
        now = time.monotonic()
        window = [lat for (t, lat) in recent if now - t <= window_s]
        del recent[: max(0, len(recent) - 2000)]
        if not window or not report_url:
            return
        body = json.dumps({"app": app, "p95_ms": _p95(window) * 1000, "samples": len(window)})
        req = urllib.request.Request(
            report_url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=0.5).close()

    total = int(duration_s * rate)
    next_report = start + report_every_s
    loop = asyncio.get_running_loop()
    for i in range(total):
        intended = start + i / rate
        now = time.monotonic()
        if intended > now:
            await asyncio.sleep(intended - now)
        task = asyncio.create_task(fire(intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if time.monotonic() >= next_report:
            next_report += report_every_s
            # Never awaited: a slow agent API must not delay the open-loop sends.
            loop.run_in_executor(None, report)
    if tasks:
        await asyncio.gather(*tasks)
    return results


def run_loadgen(
    port: int,
    rate: float,
    duration_s: float,
    out_file: str,
    report_url: str | None,
    app: str,
    timeout_s: float,
    window_s: float,
    report_every_s: float,
) -> None:
    results = asyncio.run(
        _loadgen(port, rate, duration_s, report_url, app, timeout_s, window_s, report_every_s)
    )
    Path(out_file).write_text(json.dumps({"requests": sorted(results)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tidal-qos-workload")
    parser.add_argument("--cgroup-procs", action="append", default=[])
    sub = parser.add_subparsers(dest="cmd", required=True)
    on = sub.add_parser("online")
    on.add_argument("--port", type=int, default=0)
    on.add_argument("--work-ms", type=float, default=10.0)
    on.add_argument("--ready-file")
    off = sub.add_parser("offline")
    off.add_argument("--workers", type=int, default=4)
    off.add_argument("--out", required=True)
    lg = sub.add_parser("loadgen")
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--rate", type=float, required=True)
    lg.add_argument("--duration", type=float, required=True)
    lg.add_argument("--out", required=True)
    lg.add_argument("--report-url")
    lg.add_argument("--app", default="online")
    lg.add_argument("--timeout", type=float, default=5.0)
    lg.add_argument("--window", type=float, default=3.0)
    lg.add_argument("--report-every", type=float, default=1.0)
    args = parser.parse_args(argv)
    die_with_parent()
    join_cgroups(args.cgroup_procs)
    if args.cmd == "online":
        run_online(args.port, args.work_ms, args.ready_file)
    elif args.cmd == "offline":
        run_offline(args.workers, args.out)
    else:
        run_loadgen(
            args.port,
            args.rate,
            args.duration,
            args.out,
            args.report_url,
            args.app,
            args.timeout,
            args.window,
            args.report_every,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
