"""Container start latency: run -> first output of ``echo``, p50/p99 over N starts.

Rows, all measured in the same run on the same busybox tree, interleaved round-robin:
  * bare ``runc run`` / ``crun run`` of a prepared bundle (the baseline: no engine at all);
  * Tidal engine with runc and crun, directory rootfs (overlay on a fresh quota volume);
  * Tidal engine with runc and crun, Tidal block image whose shared read-only mount is held by
    another container (warm page cache), and with runc where each start mounts the image
    (FUSE server + loop + ext4: "cold mount", data still in the page cache);
  * Tidal engine, runc, directory rootfs without a quota volume (what mkfs+loop costs).
The engine is driven in-process (``Engine.run``), so the figure is the engine's own overhead
(storage set-up, bundle, monitor) on top of the runtime; one row goes through the daemon's
HTTP API on its unix socket, the path the CLI takes. Removal is not timed.

Usage: .venv/bin/python benchmarks/bench_engine.py [--starts 200] [--quick] [--gap-s 0.3]
(``--gap-s``: the engine refills its monitor and quota-volume pools after a start; without a
gap that work overlaps the next row's sample, whichever row it is.)
Writes benchmarks/results/engine.json. Needs root, runc/crun, loop devices, FUSE.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from tidal.engine.bundle import BundleInputs, build_config, write_bundle  # noqa: E402
from tidal.engine.client import EngineClient  # noqa: E402
from tidal.engine.containers import Engine  # noqa: E402
from tidal.engine.daemon import Daemon  # noqa: E402
from tidal.engine.runtime import get_runtime  # noqa: E402
from tidal.engine.settings import EngineSettings  # noqa: E402
from tidal.engine.spec import ContainerSpec  # noqa: E402
from tidal.testing.trees import make_busybox_rootfs  # noqa: E402

BUSYBOX_CACHE = Path("/var/cache/tidal-test/busybox")
RESULTS = REPO / "benchmarks" / "results" / "engine.json"


def busybox_tree() -> Path:
    """The tests' busybox tree (one builder: tidal.testing.trees)."""
    return make_busybox_rootfs(BUSYBOX_CACHE)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def bare_runtime(name: str, rootfs: Path, work: Path) -> Callable[[], float]:
    """One ``<runtime> run`` of a ready bundle; time until the first byte of stdout."""
    rt = get_runtime(name, work / "bare-state")
    bundle = work / f"bare-{name}"
    spec = ContainerSpec(image=str(rootfs), command=("echo", "hi"))
    cfg = build_config(
        spec,
        BundleInputs(
            container_id="bare",
            rootfs=str(rootfs),
            args=("echo", "hi"),
            cgroups_path=f"/tidal-bench/bare-{name}",
            nofile_limit=1024,
        ),
    )
    cfg["root"]["readonly"] = True
    write_bundle(bundle, cfg)

    def once() -> float:
        cid = f"bench-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            rt.run_argv(cid, bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        t1 = time.perf_counter()
        proc.communicate()
        if first != b"h":
            raise SystemExit(f"bare {name} run failed: {proc.returncode}")
        return t1 - t0

    return once


def engine_start(eng: Engine, image: str, runtime: str) -> Callable[[], float]:
    """One ``Engine.run``; time until the container's first output reaches its log."""

    def once() -> float:
        t0 = time.perf_counter()
        rec = eng.run(
            ContainerSpec(image=image, command=("echo", "hi"), runtime=runtime, lxcfs=False)
        )
        log = eng.cdir(rec.id) / "container.log"
        while True:
            try:
                if log.stat().st_size > 0:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
        t1 = time.perf_counter()
        eng.wait(rec.id, 30)
        eng.remove(rec.id)
        return t1 - t0

    return once


def api_start(client: EngineClient, image: str, runtime: str) -> Callable[[], float]:
    """One start through the daemon's HTTP API (the CLI's path); first output via logs."""

    def once() -> float:
        t0 = time.perf_counter()
        rec = client.run(
            ContainerSpec(image=image, command=("echo", "hi"), runtime=runtime, lxcfs=False)
        )
        while not client.logs(rec.id)[0]:
            time.sleep(0.0005)
        t1 = time.perf_counter()
        client.wait(rec.id, 30)
        client.remove(rec.id)
        return t1 - t0

    return once


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="20 starts per row")
    ap.add_argument(
        "--gap-s",
        type=float,
        default=0.0,
        help="idle time after each sample, so background work (pool refills) ends before the next",
    )
    args = ap.parse_args()
    n = 20 if args.quick else args.starts
    if os.geteuid() != 0:
        raise SystemExit("needs root (runc, loop devices, FUSE)")
    rootfs = busybox_tree()
    work = Path(tempfile.mkdtemp(prefix="tidal-bench-engine-"))
    os.environ.setdefault("TIDAL_DATA_ROOT", str(work / "data"))
    image = work / "bbimg"
    subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", "build", str(rootfs), "-o", str(image)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    base = dict(
        state_dir=work / "engine",
        default_disk_quota_bytes=256 * 1024 * 1024,
        cgroup_parent="tidal-bench",
        lxcfs="off",
    )
    eng = Engine(EngineSettings(**base))  # type: ignore[arg-type]
    eng_noquota = Engine(EngineSettings(**{**base, "default_disk_quota_bytes": 0}))  # type: ignore[arg-type]
    eng_cold = Engine(EngineSettings(**{**base, "state_dir": work / "engine-cold"}))  # type: ignore[arg-type]
    daemon = Daemon(EngineSettings(**{**base, "state_dir": work / "engine-api"}))  # type: ignore[arg-type]
    daemon.start()
    client = EngineClient(daemon.socket_path)
    configs: list[tuple[str, Callable[[], float]]] = []
    runtimes = [r for r in ("runc", "crun") if shutil.which(r)]
    for name in runtimes:
        eng.runtime(name)  # host preparation (crun on hybrid cgroups) outside timing
        configs.append((f"bare {name} run (baseline)", bare_runtime(name, rootfs, work)))
    for name in runtimes:
        configs.append((f"tidal {name}, dir rootfs", engine_start(eng, str(rootfs), name)))
    configs.append(
        ("tidal runc via daemon API, dir rootfs", api_start(client, str(rootfs), "runc"))
    )
    # A node where the image is in use (another container holds its shared mount) ...
    holder = eng.run(ContainerSpec(image=str(image), command=("sleep", "100000"), lxcfs=False))
    for name in runtimes:
        configs.append((f"tidal {name}, Tidal image", engine_start(eng, str(image), name)))
    # ... and one where every start mounts it (FUSE server, loop device, ext4): cold mount.
    configs.append(
        ("tidal runc, Tidal image, cold mount", engine_start(eng_cold, str(image), "runc"))
    )
    configs.append(
        ("tidal runc, dir, no quota volume", engine_start(eng_noquota, str(rootfs), "runc"))
    )
    samples: dict[str, list[float]] = {name: [] for name, _ in configs}
    try:
        for _, once in configs:
            once()  # warm-up: page cache, pool, image mount path
        # Round-robin, so that load from elsewhere on the machine hits every row alike.
        for _ in range(n):
            for name, once in configs:
                samples[name].append(once())
                time.sleep(args.gap_s)
    finally:
        eng.remove(holder.id, force=True)
        for e in (eng, eng_cold, eng_noquota):
            e.close()
        client.close()
        daemon.close()
        shutil.rmtree(work, ignore_errors=True)
        for parent in Path("/sys/fs/cgroup").glob("*/tidal-bench"):  # empty by now
            with contextlib.suppress(OSError):
                parent.rmdir()
    rows = list(samples.items())

    base_p50 = {name: statistics.median(v) for name, v in rows if name.startswith("bare")}
    print(f"container start latency (run -> first output of echo), {n} starts per row")
    print(f"{'configuration':<36} {'p50 ms':>8} {'p99 ms':>8} {'vs bare p50':>12}")
    results = []
    for name, values in rows:
        p50, p99 = statistics.median(values) * 1000, pct(values, 99) * 1000
        rt = "crun" if "crun" in name else "runc"
        bare = base_p50.get(f"bare {rt} run (baseline)")
        ratio = f"{p50 / (bare * 1000):.1f}x" if bare else "-"
        print(f"{name:<36} {p50:>8.1f} {p99:>8.1f} {ratio:>12}")
        results.append(
            {
                "config": name,
                "starts": len(values),
                "p50_ms": p50,
                "p99_ms": p99,
                "vs_bare_p50": ratio,
            }
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"benchmark": "engine_start_latency", "rows": results}, indent=1) + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
