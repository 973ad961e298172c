"""Instance start latency: from the command to the instance's first process running.

Rows, all measured in the same run on the same busybox tree, interleaved round-robin:
  * bare ``runc run`` of a prepared bundle, to the first output of ``echo`` (no engine at all);
  * ``podman run -d --rootfs`` of a copy of the tree (runc, podman's bridge network): until
    the command returns with the container started;
  * ``tidal instance`` (a pod: sandbox + main container, bridge network, pod cgroup), through
    the daemon's API (``InstanceClient.run_instance``, which returns once main is running):
      - runc on the directory rootfs (the comparison with bare runc and podman),
      - runc on a Tidal image warm on the node (its shared mount held by another instance),
      - runc on a Tidal image cold from the registry: each start pulls the metadata into a
        fresh directory, mounts it lazily with an empty chunk cache (FUSE -> loop -> ext4),
      - the same two for runsc (gVisor) when its runtime driver is registered;
      - a warm-pool hit (a second daemon with ``[instance] pool_max`` on, its pool of the
        row's shape prewarmed; the wait for the pool to be full again is not timed, and a
        sample that missed the pool fails the run): runc on the directory rootfs and on the
        warm image, runsc on the warm image. Their rows also carry each phase's median
        from ``InstanceRecord.timings``;
  * ``tidal instance run`` from the CLI (a new Python process), runc, directory rootfs.
Removal is not timed; ``--gap-s`` idles after each sample so pool refills end first.

Usage: .venv/bin/python benchmarks/bench_instance.py [--starts 30] [--gap-s 0.3]
Writes benchmarks/results/instance.json. Needs root, runc, podman, docker-registry, FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engine import bare_runtime, busybox_tree, pct  # noqa: E402
from tidal.blobs.distribution import pull_image, push_image  # noqa: E402
from tidal.blobs.reference import ImageReference  # noqa: E402
from tidal.blobs.registry_client import RegistryClient  # noqa: E402
from tidal.engine.daemon import Daemon  # noqa: E402
from tidal.engine.runtime import RUNTIME_CLASSES  # noqa: E402
from tidal.engine.settings import EngineSettings  # noqa: E402
from tidal.instance.catalog import InstanceSettings  # noqa: E402
from tidal.instance.client import InstanceClient  # noqa: E402
from tidal.instance.service import instance_part  # noqa: E402
from tidal.instance.spec import InstanceSpec  # noqa: E402
from tidal.testing.registry_server import RegistryServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "instance.json"
CMD = ("sleep", "300")


def api_instance(
    client: InstanceClient,
    image: Callable[[], str],
    runtime: str,
    phases: list[dict[str, float]] | None = None,
) -> Callable[[], float]:
    """One ``run_instance`` through the daemon's socket; returns once main is running."""

    def once() -> float:
        t0 = time.perf_counter()
        img = image()  # a cold row pulls the metadata here: part of the command
        d = client.run_instance(InstanceSpec(image=img, command=CMD, runtime=runtime))
        t1 = time.perf_counter()
        if d["status"] != "running":
            raise SystemExit(f"instance {d['name']} is {d['status']}")
        if phases is not None:
            phases.append(dict(d.get("timings") or {}))
        client.remove_instance(d["id"], force=True)
        return t1 - t0

    return once


def pool_hit(
    client: InstanceClient, image: Callable[[], str], runtime: str, phases: list[dict[str, float]]
) -> Callable[[], float]:
    """One ``run_instance`` that takes a warm sandbox (the pool is full again before it)."""

    def once() -> float:
        client.wait_pools_ready(120)  # not timed: the refill after the last sample
        img = image()
        t0 = time.perf_counter()
        d = client.run_instance(InstanceSpec(image=img, command=CMD, runtime=runtime))
        t1 = time.perf_counter()
        if d["status"] != "running" or not d.get("pool_member"):
            raise SystemExit(
                f"instance {d['name']} is {d['status']}, pool member {d.get('pool_member')}"
            )
        phases.append(dict(d.get("timings") or {}))
        client.remove_instance(d["id"], force=True)
        return t1 - t0

    return once


def cli_instance(env: dict[str, str], image: str, client: InstanceClient) -> Callable[[], float]:
    """``tidal instance run`` as a user types it (prints name and IP when main runs)."""

    def once() -> float:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "instance", "run", image, "--", *CMD],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        if done.returncode != 0:
            raise SystemExit(f"tidal instance run failed: {done.stderr.strip()}")
        client.remove_instance(done.stdout.split()[0], force=True)
        return t1 - t0

    return once


def podman_run(rootfs: Path) -> Callable[[], float]:
    """``podman run -d`` of the same tree (a copy: podman writes mount points into it)."""

    def once() -> float:
        name = f"tidal-bench-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        done = subprocess.run(
            ["podman", "run", "-d", "--name", name, "--runtime", "runc",
             "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
             "--rootfs", str(rootfs), *CMD],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"podman run failed: {done.stderr.strip()}")
        return t1 - t0

    return once


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--gap-s", type=float, default=0.3)
    args = ap.parse_args()
    n = args.starts
    if os.geteuid() != 0:
        raise SystemExit("needs root (runc, cgroups, network namespaces, FUSE)")
    rootfs = busybox_tree()
    work = Path(tempfile.mkdtemp(prefix="tidal-bench-instance-", dir="/var/tmp"))
    os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    image = work / "bbimg"
    subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", "build", str(rootfs), "-o", str(image)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    podman_tree = work / "podman-rootfs"
    shutil.copytree(rootfs, podman_tree, symlinks=True)
    tag = uuid.uuid4().hex[:4]
    settings = EngineSettings(
        state_dir=work / "engine",
        default_disk_quota_bytes=256 * 1024 * 1024,
        cgroup_parent="tidal-bench-inst",
        bridge=f"tdbi{tag}",
        subnet=f"10.{230 + int(tag[:2], 16) % 20}.{int(tag[2:], 16)}.0/24",
        lxcfs="off",
    )
    daemon = Daemon(settings, parts=[instance_part])
    daemon.start()
    client = InstanceClient(daemon.socket_path)
    cli_env = {
        **env,
        "TIDAL_ENGINE__STATE_DIR": str(settings.state_dir),
        "TIDAL_ENGINE__CGROUP_PARENT": settings.cgroup_parent,
        "TIDAL_ENGINE__BRIDGE": settings.bridge,
        "TIDAL_ENGINE__SUBNET": settings.subnet,
    }
    # the same engine with warm pools, for the pool-hit rows (its own state, bridge, cgroups)
    ptag = uuid.uuid4().hex[:4]
    pool_settings = EngineSettings(
        state_dir=work / "engine-pools",
        default_disk_quota_bytes=256 * 1024 * 1024,
        cgroup_parent="tidal-bench-pool",
        bridge=f"tdbp{ptag}",
        subnet=f"10.{230 + int(ptag[:2], 16) % 20}.{int(ptag[2:], 16)}.0/24",
        lxcfs="off",
    )
    pool_daemon = Daemon(
        pool_settings, parts=[partial(instance_part, settings=InstanceSettings(pool_max=4))]
    )
    pool_daemon.start()
    pclient = InstanceClient(pool_daemon.socket_path)
    registry = RegistryServer().start()
    reg_client = RegistryClient(registry.address)
    ref = ImageReference.parse(f"{registry.address}/bench/busybox:v1")
    push_image(image, ref, reg_client)
    cold_n = [0]

    def cold_image() -> str:
        """Metadata pulled into a fresh directory, and a fresh (empty) chunk cache."""
        cold_n[0] += 1
        dest = work / "pulled" / str(cold_n[0])
        os.environ["TIDAL_BLOBS__CACHE_DIR"] = str(work / "cache" / str(cold_n[0]))
        pull_image(ref, dest, reg_client)
        return str(dest)

    runtimes = ["runc"] + (
        ["runsc"] if "runsc" in RUNTIME_CLASSES and shutil.which("runsc") else []
    )
    configs: list[tuple[str, Callable[[], float]]] = [
        ("bare runc run (baseline)", bare_runtime("runc", rootfs, work)),
    ]
    if shutil.which("podman"):
        configs.append(("podman run -d --rootfs (runc)", podman_run(podman_tree)))
    phases: dict[str, list[dict[str, float]]] = {"tidal instance runc, dir rootfs": []}
    configs.append(
        (
            "tidal instance runc, dir rootfs",
            api_instance(
                client, lambda: str(rootfs), "runc", phases["tidal instance runc, dir rootfs"]
            ),
        )
    )
    holder = client.run_instance(InstanceSpec(image=str(image), command=CMD, name="holder"))
    for rt in runtimes:
        configs.append(
            (f"tidal instance {rt}, image warm", api_instance(client, lambda: str(image), rt))
        )
        configs.append(
            (f"tidal instance {rt}, image cold (registry)", api_instance(client, cold_image, rt))
        )
    configs.append(
        ("tidal instance run (CLI), runc, dir", cli_instance(cli_env, str(rootfs), client))
    )
    pool_rows = [
        ("runc", "dir rootfs", lambda: str(rootfs)),
        ("runc", "image warm", lambda: str(image)),
        *([("runsc", "image warm", lambda: str(image))] if "runsc" in runtimes else []),
    ]
    for rt, what, img_of in pool_rows:
        name = f"tidal instance {rt}, {what}, pool hit"
        phases[name] = []
        configs.append((name, pool_hit(pclient, img_of, rt, phases[name])))
    samples: dict[str, list[float]] = {name: [] for name, _ in configs}
    load_before = os.getloadavg()[0]
    pool_holder: dict[str, object] = {}
    try:
        # inside the try: a failure here still removes what the daemons made
        pool_holder = pclient.run_instance(
            InstanceSpec(image=str(image), command=CMD, name="holder")
        )
        for rt, _, img_of in pool_rows:
            pclient.prewarm_pool(InstanceSpec(image=img_of(), command=CMD, runtime=rt), 2)
        for _, once in configs:
            once()  # warm-up: page cache, pools, the pause rootfs
            time.sleep(args.gap_s)
        for _ in range(n):  # round-robin: load from elsewhere hits every row alike
            for name, once in configs:
                # not timed: no row shares the CPUs with the pool daemon's refill of the
                # member the last pool hit took
                pclient.wait_pools_ready(120)
                samples[name].append(once())
                time.sleep(args.gap_s)
    finally:
        with contextlib.suppress(Exception):
            client.remove_instance(holder["id"], force=True)
        with contextlib.suppress(Exception):
            if pool_holder:
                pclient.remove_instance(str(pool_holder["id"]), force=True)
        with contextlib.suppress(Exception):
            pclient.drain_pools()
        client.close()
        daemon.close()
        pclient.close()
        pool_daemon.close()
        reg_client.close()
        registry.stop()
        for bridge in (settings.bridge, pool_settings.bridge):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        for parent in Path("/sys/fs/cgroup").glob("*/tidal-bench*"):
            with contextlib.suppress(OSError):
                parent.rmdir()
        shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()[0]
    bare = statistics.median(samples["bare runc run (baseline)"])
    print(f"instance start latency (command -> first process running), {n} starts per row")
    print(f"{'configuration':<44} {'p50 ms':>8} {'p99 ms':>8} {'vs bare runc p50':>17}")
    rows = []
    for name, values in samples.items():
        p50, p99 = statistics.median(values) * 1000, pct(values, 99) * 1000
        ratio = f"{p50 / (bare * 1000):.1f}x"
        print(f"{name:<44} {p50:>8.1f} {p99:>8.1f} {ratio:>17}")
        row: dict[str, object] = {
            "config": name,
            "starts": len(values),
            "p50_ms": p50,
            "p99_ms": p99,
            "vs_bare_p50": ratio,
        }
        if phases.get(name):
            keys = list(phases[name][-1])
            row["phases_p50_ms"] = {
                k: round(statistics.median(t.get(k, 0.0) for t in phases[name]) * 1000, 1)
                for k in keys
            }
            print(f"{'':<44} phases p50 ms: {row['phases_p50_ms']}")
        rows.append(row)
    targets = {
        "runc instance p50 <= 2x bare runc": samples["tidal instance runc, dir rootfs"],
        "runc instance p50 <= 2x bare runc, pool hit": samples[
            "tidal instance runc, dir rootfs, pool hit"
        ],
    }
    if "runsc" in runtimes:
        targets["runsc p50 <= 400 ms, image warm"] = samples["tidal instance runsc, image warm"]
        targets["runsc p50 <= 400 ms, image warm, pool hit"] = samples[
            "tidal instance runsc, image warm, pool hit"
        ]
    verdicts = {}
    for what, values in targets.items():
        p50 = statistics.median(values)
        ok = p50 <= 2 * bare if "runc" in what.split()[0] else p50 <= 0.4
        verdicts[what] = {"p50_ms": p50 * 1000, "met": ok}
        print(f"target {what}: {'met' if ok else 'NOT met'} ({p50 * 1000:.0f} ms)")
    if "runsc" not in runtimes:
        print("runsc rows: the runsc runtime driver is not registered in this tree")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"benchmark": "instance_start_latency", "rows": rows, "targets": verdicts,
             "runsc": "runsc" in runtimes,
             "loadavg_1m": {"start": load_before, "end": load_after}},
            indent=1,
        ) + "\n"
    )  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
