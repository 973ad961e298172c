"""Instance throughput: N instances of one spec started by concurrent clients, per case.

Cases, all in the same run, on the same busybox tree, each instance ``sleep 3600`` kept
alive until the case's burst is over (so N instances are live at once), then removed by as many
clients (timed apart: ``removed_per_min``):
  * Tidal with pools, burst from a full pool (``POST /v1/instances/pools`` for N, then
    ``wait_ready``), and sustained with refill (a pool of ``--pool-max``, refilled while the
    burst runs);
  * Tidal without pools (``pool_max = 0``),
    and the same with container monitors started as interpreters instead of forked from the
    engine's zygote (the light path's "before", skipped with ``--skip interpreters``);
  * ``podman run -d --rootfs`` (runc, podman's bridge network);
  * bare ``runc create`` + ``runc start`` of prepared bundles (no engine at all);
  * beside them, the same Tidal and bare cases under runsc (gVisor) for ``--runsc-count``.
Clients are threads, each with one long-lived :class:`InstanceClient` (one connection, no
Python start-up per instance), taking the next instance index from a shared counter.
Latency is one ``run_instance`` call (returns once main runs); instances per minute is N
over the time from the first call to the last answer.

Afterwards the run's resources are looked for (:func:`tidal.testing.leaks.find_leaks`: mounts,
loop devices, cgroups, netns, veths, runtime and podman containers, records) and the
benchmark fails loudly if anything is left.

Usage: .venv/bin/python benchmarks/bench_instance_rate.py [--count 500] [--clients 4]
Writes benchmarks/results/instance_rate.json and instance_rate.png. Needs root, runc,
podman (optional), runsc (optional), matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engine import busybox_tree, pct  # noqa: E402
from tidal.engine.bundle import BundleInputs, build_config, write_bundle  # noqa: E402
from tidal.engine.daemon import Daemon  # noqa: E402
from tidal.engine.network import netns_name  # noqa: E402
from tidal.engine.runtime import RUNTIME_CLASSES, Runtime, get_runtime  # noqa: E402
from tidal.engine.settings import EngineSettings  # noqa: E402
from tidal.engine.spec import ContainerSpec  # noqa: E402
from tidal.engine.store import Store  # noqa: E402
from tidal.errors import TidalError  # noqa: E402
from tidal.instance.catalog import InstanceSettings  # noqa: E402
from tidal.instance.client import InstanceClient  # noqa: E402
from tidal.instance.service import instance_part  # noqa: E402
from tidal.instance.spec import InstanceSpec  # noqa: E402
from tidal.testing.leaks import LeakScope, find_leaks  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "instance_rate.json"
PLOT = REPO / "benchmarks" / "results" / "instance_rate.png"
CMD = ("sleep", "3600")
RUNSC_DEFAULT_MAX = 40
"""runsc instances by default: 500 gVisor sandboxes ran this machine out of threads (EAGAIN)."""


@dataclasses.dataclass
class Burst:
    """One case's samples: (seconds since the burst began at the call, latency seconds)."""

    name: str
    samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        lat = [s[1] for s in self.samples]
        return {
            "case": self.name,
            "instances": len(lat),
            "failed": len(self.errors),
            "first_errors": self.errors[:3],
            "wall_s": round(self.wall_s, 3),
            "instances_per_min": round(len(lat) / self.wall_s * 60, 1) if self.wall_s else 0,
            "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "p99_ms": round(pct(lat, 99) * 1000, 1) if lat else None,
            **self.extra,
        }


def burst(name: str, count: int, clients: int, make: Callable[[], Callable[[int], None]]) -> Burst:
    """``count`` calls of ``one(i)`` from ``clients`` threads (``make()`` per thread: its own
    long-lived client); a failed call is recorded and the burst goes on."""
    out = Burst(name)
    lock = threading.Lock()
    next_i = [0]
    first: list[float] = []
    last = [0.0]

    stop = threading.Event()

    def worker() -> None:
        one = make()
        while not stop.is_set():
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= count:
                return
            t0 = time.perf_counter()
            try:
                one(i)
            except (TidalError, OSError, subprocess.SubprocessError) as exc:
                with lock:
                    out.errors.append(f"{i}: {exc}")
                continue
            t1 = time.perf_counter()
            with lock:
                out.samples.append((t0 - first[0], t1 - t0))
                last[0] = max(last[0], t1)

    first.append(time.perf_counter())
    threads = [threading.Thread(target=worker, name=f"rate-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:  # let the calls in flight finish, so clean-up finds them all
        stop.set()
        for t in threads:
            t.join()
        raise
    out.wall_s = (last[0] or time.perf_counter()) - first[0]
    out.samples.sort()
    return out


def parallel(items: list[Any], fn: Callable[[Any], object], workers: int) -> list[str]:
    """Untimed clean-up of many items at once; returns the failures."""
    errors: list[str] = []
    it = iter(list(items))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            try:
                fn(item)
            except (TidalError, OSError, subprocess.SubprocessError) as exc:
                with lock:
                    errors.append(f"{item}: {exc}")

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def memory_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) bytes of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    got = {ln.split()[0].rstrip(":"): int(ln.split()[1]) * 1024 for ln in text.splitlines()[1:]}
    return got.get("Rss", 0), got.get("Pss", 0)


def monitor_memory(state_db: Path) -> dict[str, Any]:
    """RSS and PSS of the live container monitors the engine recorded (PSS shares the
    interpreter's pages among them: what each one really adds)."""
    store = Store(state_db)
    try:
        pids = [r.monitor_pid for r in store.list() if r.monitor_pid]
    finally:
        store.close()
    mems = [m for m in (proc_memory(p) for p in pids) if m]
    if not mems:
        return {}
    return {
        "monitors": len(mems),
        "monitor_rss_mib_mean": round(statistics.mean(m[0] for m in mems) / 2**20, 2),
        "monitor_pss_mib_mean": round(statistics.mean(m[1] for m in mems) / 2**20, 2),
        "monitors_pss_mib_total": round(sum(m[1] for m in mems) / 2**20, 1),
    }


class TidalCase:
    """A daemon (instance API) on the run's private engine settings, for one case."""

    def __init__(self, settings: EngineSettings, iset: InstanceSettings) -> None:
        self.settings = settings
        self.daemon = Daemon(settings, parts=[partial(instance_part, settings=iset)])
        self.daemon.start()
        self.clients: list[InstanceClient] = []
        self.ids: list[str] = []
        self.container_ids: list[str] = []
        self.lock = threading.Lock()

    def client(self) -> InstanceClient:
        c = InstanceClient(self.daemon.socket_path)
        with self.lock:
            self.clients.append(c)
        return c

    def runner(self, spec: InstanceSpec, prefix: str) -> Callable[[], Callable[[int], None]]:
        def make() -> Callable[[int], None]:
            client = self.client()

            def one(i: int) -> None:
                d = client.run_instance(dataclasses.replace(spec, name=f"{prefix}-{i}"))
                with self.lock:
                    self.ids.append(d["id"])
                    self.container_ids += [c["id"] for c in d["containers"]]
                if d["status"] != "running":
                    raise TidalError(f"instance {d['name']} is {d['status']}")

            return one

        return make

    def remove_all(self, workers: int) -> list[str]:
        """Every instance the daemon has (not only those whose call answered: one cut short
        may exist all the same)."""

        def rm(iid: str) -> None:
            with InstanceClient(self.daemon.socket_path) as c:
                c.remove_instance(iid, force=True)

        with InstanceClient(self.daemon.socket_path) as c:
            listed = c.instances()
        known = [d["id"] for d in listed]
        self.container_ids += [x["id"] for d in listed for x in d["containers"]]
        errors = parallel(sorted(set(self.ids) | set(known)), rm, workers)
        self.ids.clear()
        return errors

    def close(self) -> None:
        """Drain the pools first: a stopped daemon's warm members live on by design (the
        next daemon takes them back), so without it a pooled case would leave them."""
        with contextlib.suppress(TidalError, OSError), InstanceClient(self.daemon.socket_path) as c:
            c.drain_pools()
        for c in self.clients:
            c.close()
        self.daemon.close()


def fill_pool(
    client: InstanceClient, spec: InstanceSpec, count: int, timeout_s: float = 900
) -> None:
    """Prewarm the spec's pool to ``count`` and wait until every pool is at its target."""
    client.prewarm_pool(spec, count)
    client.wait_pools_ready(timeout_s)
    short = [p for p in client.pools() if int(p["ready"]) < int(p["target"])]
    if short:
        raise SystemExit(f"the pools did not reach their targets in {timeout_s:.0f} s: {short}")


def tidal_burst(
    name: str,
    settings: EngineSettings,
    iset: InstanceSettings,
    spec: InstanceSpec,
    count: int,
    clients: int,
    netns: list[str],
    prewarm: int = 0,
    zygote: bool = True,
) -> Burst:
    case = TidalCase(settings, iset)
    case.daemon.engine.monitors.use_zygote = zygote
    left: list[str] = []
    try:
        warm = case.runner(spec, f"warm-{uuid.uuid4().hex[:4]}")()
        for i in range(2):  # page cache, the pause rootfs, the monitor pool
            warm(i)
        case.remove_all(clients)
        if prewarm:
            fill_pool(case.client(), spec, prewarm)
        mem0 = memory_available()
        prefix = f"r{uuid.uuid4().hex[:4]}"
        out = burst(name, count, clients, case.runner(spec, prefix))
        out.extra.update(monitor_memory(settings.resolved_state_dir() / "state.db"))
        out.extra.update(pool_counts(case.client().pools()))
        out.extra["burst_memory_mib"] = round((mem0 - memory_available()) / 2**20, 1)
    finally:
        netns += [netns_name(cid) for cid in case.container_ids]
        t0 = time.monotonic()
        left = case.remove_all(clients)  # also after an interrupted burst
        removal_s = time.monotonic() - t0
        case.close()
    out.errors += left
    # the removals, by as many clients (untimed in the burst; a node that keeps creating
    # also keeps removing, so their cost is reported beside it)
    out.extra["removed_per_min"] = round(len(out.samples) / removal_s * 60, 1)
    return out


def pool_counts(pools: list[dict[str, Any]]) -> dict[str, int]:
    """Hits, misses and the members still ready after a burst, over every pool (none: {})."""
    if not pools:
        return {}
    return {f"pool_{k}": sum(int(p[k]) for p in pools) for k in ("hits", "misses", "ready")}


def podman_burst(rootfs: Path, count: int, clients: int, prefix: str) -> Burst:
    names: list[str] = []

    def make() -> Callable[[int], None]:
        def one(i: int) -> None:
            name = f"{prefix}-{i}"
            names.append(name)
            done = subprocess.run(
                ["podman", "run", "-d", "--name", name, "--runtime", "runc",
                 "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                 "--rootfs", str(rootfs), *CMD],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise OSError(f"podman run failed: {done.stderr.strip()}")

        return one

    mem0 = memory_available()
    try:
        out = burst("podman run -d --rootfs (runc)", count, clients, make)
        out.extra["burst_memory_mib"] = round((mem0 - memory_available()) / 2**20, 1)
    finally:
        for first in range(0, len(names), 50):
            subprocess.run(
                ["podman", "rm", "-f", "-t", "0", *names[first : first + 50]],
                capture_output=True, check=False,
            )  # fmt: skip
    return out


def bare_burst(
    runtime: str, rootfs: Path, work: Path, count: int, clients: int, cgroup_parent: str
) -> tuple[Burst, Path]:
    """``<runtime> create`` + ``start`` of bundles written ahead (untimed), one per instance
    (each its own cgroup path), through the engine's thin runtime driver."""
    rt: Runtime = get_runtime(runtime, work / f"bare-{runtime}-state")
    bundles = work / f"bare-{runtime}-bundles"
    ids = [f"rate-{runtime}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for cid in ids:
        spec = ContainerSpec(image=str(rootfs), command=CMD)
        cfg = build_config(
            spec,
            BundleInputs(
                container_id=cid,
                rootfs=str(rootfs),
                args=CMD,
                cgroups_path=f"/{cgroup_parent}/{cid}",
                nofile_limit=1024,
            ),
        )
        cfg["root"]["readonly"] = True
        write_bundle(bundles / cid, cfg)
    made: list[str] = []

    def make() -> Callable[[int], None]:
        def one(i: int) -> None:
            cid = ids[i]
            b = bundles / cid
            made.append(cid)
            with open(os.devnull, "wb") as null:
                rt.create(
                    cid, b, pid_file=b / "pid", log_path=b / "runtime.log",
                    stdout=null.fileno(), stderr=null.fileno(),
                )  # fmt: skip
            rt.start(cid)

        return one

    mem0 = memory_available()
    left: list[str] = []
    try:
        out = burst(f"bare {runtime} create+start", count, clients, make)
        out.extra["burst_memory_mib"] = round((mem0 - memory_available()) / 2**20, 1)
    finally:
        left = parallel(made, lambda cid: rt.delete(cid, force=True), clients)
    out.errors += left
    for d in Path("/sys/fs/cgroup").glob(f"*/{cgroup_parent}"):
        with contextlib.suppress(OSError):  # the case's own parent; a non-empty one stays
            d.rmdir()
    return out, rt.root


def plot(bursts: list[Burst], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for b in bursts:
        if b.samples:
            ax.plot(
                [s[0] for s in b.samples],
                [s[1] * 1000 for s in b.samples],
                ".",
                markersize=3,
                label=f"{b.name} ({b.row()['instances_per_min']:.0f}/min)",
            )
    ax.set_xlabel("seconds since the burst began (call time)")
    ax.set_ylabel("latency of one start, ms")
    ax.set_yscale("log")
    ax.set_title("Instance starts over a burst (concurrent long-lived clients)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=500, help="instances per case")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument(
        "--runsc-count",
        type=int,
        default=None,
        help=f"runsc cases (default: --count, at most {RUNSC_DEFAULT_MAX}: each gVisor sandbox "
        "runs dozens of threads, and 500 of them exhaust a 24 GiB machine's)",
    )
    ap.add_argument("--pool-max", type=int, default=32, help="sustained case's pool size")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        help="case to skip: podman, bare, runsc, interpreters",
    )
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.count < 1 or args.clients < 1:
        raise SystemExit("--count and --clients must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("needs root (runc, cgroups, network namespaces)")
    runsc_n = min(args.count, RUNSC_DEFAULT_MAX) if args.runsc_count is None else args.runsc_count
    rootfs = busybox_tree()
    work = Path(tempfile.mkdtemp(prefix="tidal-bench-rate-", dir="/var/tmp"))
    tag = uuid.uuid4().hex[:4]
    parent = f"tidal-bench-rate-{tag}"
    settings = EngineSettings(
        state_dir=work / "engine",
        default_disk_quota_bytes=256 * 1024 * 1024,
        cgroup_parent=parent,
        bridge=f"tdbr{tag}",
        # /20: room for thousands of live instances (a /24 holds 253)
        subnet=f"10.{200 + int(tag[:2], 16) % 40}.{16 * (int(tag[2:], 16) % 16)}.0/20",
        lxcfs="off",
    )
    podman_tree = work / "podman-rootfs"
    shutil.copytree(rootfs, podman_tree, symlinks=True)
    podman_prefix = f"tidal-bench-rate-{tag}"
    spec = InstanceSpec(image=str(rootfs), command=CMD)
    netns: list[str] = []
    runtime_roots: list[Path] = []
    have_runsc = "runsc" in RUNTIME_CLASSES and shutil.which("runsc") is not None
    results: list[dict[str, Any]] = []
    bursts: list[Burst] = []

    def record(b: Burst) -> None:
        bursts.append(b)
        row = b.row()
        results.append(row)
        print(
            f"{row['case']:<48} {row['instances']:>5} ok {row['failed']:>3} failed "
            f"{row['instances_per_min']:>8.1f}/min p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms",
            flush=True,
        )
        for e in b.errors[:3]:
            print(f"    error: {e}", flush=True)

    def skipped(name: str, why: str) -> None:
        print(f"{name:<48} skipped: {why}", flush=True)
        results.append({"case": name, "skipped": why})

    try:
        for rt in ["runc"] + (["runsc"] if have_runsc and "runsc" not in args.skip else []):
            n = args.count if rt == "runc" else runsc_n
            rspec = dataclasses.replace(spec, runtime=rt)
            burst_name, sustained_name = f"tidal {rt}, pool burst", f"tidal {rt}, pool sustained"
            full = InstanceSettings(pool_max=n)
            record(tidal_burst(burst_name, settings, full, rspec, n, args.clients, netns, n))
            refill = InstanceSettings(pool_max=args.pool_max)
            record(tidal_burst(sustained_name, settings, refill, rspec, n, args.clients, netns))
            no_pools = InstanceSettings(pool_max=0)
            record(
                tidal_burst(
                    f"tidal {rt}, no pools", settings, no_pools, rspec, n, args.clients, netns
                )
            )
            if rt == "runc" and "interpreters" not in args.skip:
                # the light path's before: monitors started as interpreters, not forked
                name = f"tidal {rt}, no pools, monitors as interpreters (before)"
                record(
                    tidal_burst(
                        name, settings, no_pools, rspec, n, args.clients, netns, zygote=False
                    )
                )
            if "bare" not in args.skip:
                b, root = bare_burst(rt, rootfs, work, n, args.clients, f"{parent}/bare")
                runtime_roots.append(root)
                record(b)
            if rt == "runc" and "podman" not in args.skip:
                if shutil.which("podman"):
                    record(podman_burst(podman_tree, n, args.clients, podman_prefix))
                else:
                    skipped("podman run -d --rootfs (runc)", "podman is not installed")
        if not have_runsc:
            skipped("runsc cases", "runsc or its runtime driver is not available")
    finally:
        leaks = find_leaks(
            LeakScope(
                root=work,
                engine_state=settings.resolved_state_dir(),
                cgroup_parents=(parent,),
                netns=tuple(netns),
                bridge=settings.bridge,
                runtime_roots=tuple(runtime_roots),
                podman_prefix=podman_prefix,
            )
        )
        subprocess.run(["ip", "link", "del", settings.bridge], capture_output=True, check=False)
        for d in sorted(Path("/sys/fs/cgroup").glob(f"*/{parent}/**/"), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        for d in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
            with contextlib.suppress(OSError):
                d.rmdir()
        if not leaks:
            shutil.rmtree(work, ignore_errors=True)
        elif sys.exc_info()[0] is not None:  # interrupted: say so before the traceback
            print(f"LEAKS (work dir {work} kept): {leaks}", file=sys.stderr)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    png = args.results.with_suffix(".png")
    plot(bursts, png)
    doc = {
        "benchmark": "instance_rate",
        "count": args.count,
        "clients": args.clients,
        "cases": results,
        "leaks": leaks,
        "loadavg": os.getloadavg(),
        "goal": ">= 1000 instances/min sustained with p50 <= 200 ms (runc)",
    }
    args.results.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.results} and {png}")
    if leaks:
        print("LEAKS: the benchmark left these behind (work dir kept):", file=sys.stderr)
        for line in leaks:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(f"bench_instance_rate left {len(leaks)} resource(s) behind")


if __name__ == "__main__":
    main()
