"""Where one instance's start goes: CLI, HTTP API, daemon, engine create, rootfs and mounts,
network, monitor hand-over, runtime create/start -- in-process and over the socket.

The engine and instance code is timed from outside, by wrapping its functions here (nothing
in ``src/`` is instrumented); the runtime's own ``create``/``start`` are timed by a runc
wrapper script set as ``[engine] runc_binary`` that logs each call's duration. Rows:
  * ``manager.run`` in-process (no HTTP), one at a time, then ``--clients`` at once;
  * ``run_instance`` over the daemon's socket, one at a time (API = socket - in-process);
  * ``tidal instance run`` from the CLI (a new interpreter per instance), and the CLI's bare
    import of ``tidal.cli.main``.
Phases are wall time per call (they overlap where the manager runs them in parallel: the
sandbox's create beside main's; the sandbox's start beside main's).

Usage: .venv/bin/python benchmarks/bench_instance_phases.py [--starts 20] [--clients 4]
Writes benchmarks/results/instance_phases.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engine import busybox_tree, pct  # noqa: E402
from bench_instance_rate import monitor_memory  # noqa: E402
from tidal.engine import containers, launcher, network, podns, storage, store  # noqa: E402
from tidal.engine.containers import Engine  # noqa: E402
from tidal.engine.daemon import Daemon  # noqa: E402
from tidal.engine.settings import EngineSettings  # noqa: E402
from tidal.instance import limits, manager  # noqa: E402
from tidal.instance.catalog import InstanceSettings  # noqa: E402
from tidal.instance.client import InstanceClient  # noqa: E402
from tidal.instance.manager import InstanceManager  # noqa: E402
from tidal.instance.service import instance_part  # noqa: E402
from tidal.instance.spec import InstanceSpec  # noqa: E402
from tidal.testing.daemon import daemon_env  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "instance_phases.json"
CMD = ("sleep", "300")
_samples: dict[str, list[float]] = defaultdict(list)
_lock = threading.Lock()

RUNC_WRAPPER = """#!/bin/sh
# times each runc verb into $LOG (the verb is the first argument that is not a flag)
verb=""
skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case "$a" in --root|--log|--log-format) skip=1;; -*) ;; *) verb=$a; break;; esac
done
t0=$(date +%s%N)
{real} "$@"
rc=$?
t1=$(date +%s%N)
echo "runc $verb $(( (t1 - t0) / 1000 ))" >> {log}
exit $rc
"""


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            with _lock:
                _samples[name].append(time.perf_counter() - t0)

    return wrapper


def instrument() -> None:
    """Wrap the start path's steps (the names are the rows of the breakdown)."""
    targets: list[tuple[Any, str, str]] = [
        (InstanceManager, "run", "instance: manager.run (total)"),
        (InstanceManager, "_make", "instance: make (cgroup .. running)"),
        (limits.PodCgroup, "create", "instance: pod cgroup + limits"),
        (manager, "apply_net", "instance: tc shaping on the veth"),
        (Engine, "_create", "engine: create (one container)"),
        (storage.Storage, "prepare", "engine create: rootfs (quota volume, overlay)"),
        (network.BridgeNetwork, "create_netns", "engine create: netns + veth + address"),
        (Engine, "_ensure_bridge", "engine create: bridge check"),
        (podns.HostPodNamespaces, "create", "engine create: pod IPC/UTS namespace files"),
        (containers, "check_ports", "engine create: port check"),
        (store.Store, "insert", "engine: sqlite insert"),
        (store.Store, "update", "engine: sqlite update"),
        (Engine, "start", "engine: start (one container)"),
        (Engine, "_bundle", "engine start: bundle (config.json)"),
        (containers, "hand_over", "engine start: monitor hand-over -> running report"),
        (launcher.MonitorPool, "take", "engine start: take a warm monitor"),
    ]
    for owner, attr, name in targets:
        setattr(owner, attr, timed(name, getattr(owner, attr)))


def runc_wrapper(work: Path) -> tuple[Path, Path]:
    real = shutil.which("runc")
    if real is None:
        raise SystemExit("needs runc")
    log = work / "runc-times.log"
    script = work / "runc-timed"
    script.write_text(RUNC_WRAPPER.format(real=real, log=log))
    script.chmod(0o755)
    return script, log


def read_runc_log(log: Path) -> None:
    if not log.exists():
        return
    for line in log.read_text().splitlines():
        _, verb, us = line.split()
        _samples[f"runtime: runc {verb}"].append(int(us) / 1e6)
    log.unlink()


def summary() -> dict[str, dict[str, float]]:
    out = {}
    for name, vals in sorted(_samples.items()):
        out[name] = {
            "n": len(vals),
            "p50_ms": round(statistics.median(vals) * 1000, 1),
            "p90_ms": round(pct(vals, 90) * 1000, 1),
        }
    _samples.clear()
    return out


def show(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n== {title}")
    for name, r in rows.items():
        print(f"  {name:<58} n={r['n']:>4}  p50 {r['p50_ms']:>8.1f} ms  p90 {r['p90_ms']:>8.1f} ms")


def in_process(
    mgr: InstanceManager, spec: InstanceSpec, args: Any, runc_log: Path, engine: Engine, mode: str
) -> dict[str, Any]:
    """``manager.run`` one at a time, then ``--clients`` at once, with monitors from ``mode``."""
    report: dict[str, Any] = {}
    for _ in range(2):  # warm-up of this mode
        mgr.remove(mgr.run(spec).id, force=True)
    summary()
    runc_log.unlink(missing_ok=True)
    for _ in range(args.starts):
        mgr.remove(mgr.run(spec).id, force=True)
        time.sleep(args.gap_s)
    read_runc_log(runc_log)
    report["sequential"] = rows = summary()
    show(f"in-process, one at a time, monitors: {mode} (removal not shown)", rows)
    ids: list[str] = []
    per_client = max(1, args.starts // args.clients)

    def worker() -> None:
        for _ in range(per_client):
            rec = mgr.run(spec)
            with _lock:
                ids.append(rec.id)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    read_runc_log(runc_log)
    rows = summary()
    mem = monitor_memory(engine.state_dir / "state.db")
    report["concurrent"] = {"clients": args.clients, "wall_s": wall, "rows": rows, **mem}
    show(f"in-process, {args.clients} at once ({len(ids)} instances, {wall:.1f} s), "
         f"monitors: {mode}; {mem}", rows)  # fmt: skip
    for iid in ids:
        mgr.remove(iid, force=True)
    summary()
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--gap-s", type=float, default=0.3)
    ap.add_argument(
        "--monitors", nargs="+", default=["interpreters", "zygote"],
        choices=["interpreters", "zygote"], help="monitor start modes to compare, in order",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    rootfs = str(busybox_tree())
    work = Path(tempfile.mkdtemp(prefix="tidal-bench-phases-", dir="/var/tmp"))
    os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
    wrapper, runc_log = runc_wrapper(work)
    tag = uuid.uuid4().hex[:4]
    settings = EngineSettings(
        state_dir=work / "engine",
        default_disk_quota_bytes=256 * 1024 * 1024,
        cgroup_parent=f"tidal-bench-phases-{tag}",
        bridge=f"tdbp{tag}",
        subnet=f"10.{200 + int(tag[:2], 16) % 40}.{int(tag[2:], 16)}.0/24",
        lxcfs="off",
        runc_binary=str(wrapper),
    )
    instrument()
    spec = InstanceSpec(image=rootfs, command=CMD)
    report: dict[str, Any] = {"benchmark": "instance_phases", "starts": args.starts}
    daemon = Daemon(settings, parts=[functools.partial(instance_part, settings=InstanceSettings())])
    daemon.start()
    mgr = InstanceManager(daemon.engine, InstanceSettings())
    client = InstanceClient(daemon.socket_path)
    try:
        for mode in args.monitors:
            daemon.engine.monitors.use_zygote = mode == "zygote"
            report[mode] = in_process(mgr, spec, args, runc_log, daemon.engine, mode)
        # over the socket, one at a time
        api: list[float] = []
        for _ in range(args.starts):
            t0 = time.perf_counter()
            d = client.run_instance(spec)
            api.append(time.perf_counter() - t0)
            client.remove_instance(d["id"], force=True)
            time.sleep(args.gap_s)
        read_runc_log(runc_log)
        rows = summary()
        rows["api: run_instance over the socket (client side)"] = {
            "n": len(api),
            "p50_ms": round(statistics.median(api) * 1000, 1),
            "p90_ms": round(pct(api, 90) * 1000, 1),
        }
        report["api_sequential"] = rows
        show("over the daemon's socket, one at a time", rows)
        # the CLI: a new interpreter per instance
        env = {**daemon_env(settings), "PYTHONPATH": str(REPO / "src")}
        cli: list[float] = []
        imp: list[float] = []
        for _ in range(max(3, args.starts // 4)):
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "tidal.cli.main", "instance", "run", rootfs, "--", *CMD],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            cli.append(time.perf_counter() - t0)
            client.remove_instance(done.stdout.split()[0], force=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import tidal.cli.main"], env=env, check=True)
            imp.append(time.perf_counter() - t0)
        summary()
        report["cli"] = {
            "tidal instance run (new process)": round(statistics.median(cli) * 1000, 1),
            "python -c 'import tidal.cli.main'": round(statistics.median(imp) * 1000, 1),
        }
        print(f"\n== CLI (p50 ms): {report['cli']}")
    finally:
        for d in client.instances():
            client.remove_instance(d["id"], force=True)
        client.close()
        daemon.close()
        subprocess.run(["ip", "link", "del", settings.bridge], capture_output=True, check=False)
        for d in sorted(Path("/sys/fs/cgroup").glob(f"*/{settings.cgroup_parent}"), reverse=True):
            try:
                d.rmdir()
            except OSError:
                print(f"left: {d}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    report["loadavg"] = os.getloadavg()
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
