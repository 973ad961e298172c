"""Time to an application's first useful output: full pull of a gzip OCI image vs Tidal lazy start.

The image is a Debian bookworm root filesystem (``debootstrap --variant=minbase`` with python3,
numpy, scipy, pandas, matplotlib, lxml, pillow and ICU; apt caches removed as in Debian's
container images), several hundred MB of files. It is built once and cached in
/var/cache/tidal-bench/rootfs-bookworm-lazy (network needed only the first time; ``--rootfs DIR``
uses another tree). From it the bench makes, also cached (under /var/cache/tidal-bench/lazy-start/,
rebuilt when the tree or Tidal's image format code changes, or with ``--rebuild``):

- the ordinary OCI image: one ``tar | gzip -6`` layer in an OCI layout (what ``docker build``
  pushes), and
- the Tidal image: ``build_from_dir`` (ext4 in lz4 ZFile chunks).

Each run records a start-up trace per application (``record_trace`` on the local image, stored
with ``attach_trace``) and pushes everything with skopeo and ``push_image`` into one CNCF
registry (storage in the bench's work directory). Then, for each link rate, that registry runs in
a network namespace behind a veth pair shaped with ``tc tbf`` (``ThrottledLink``) and every case
starts the application from nothing:

  (1) baseline      ``skopeo copy docker://... oci:DIR``, ``tar -xzf`` the layer into a
                    directory, run the application chrooted there
  (2) lazy cold     ``pull_image`` (manifest and config only), ``mount_image`` (registry ->
                    chunk cache -> FUSE -> loop -> ext4), run chrooted in the mount; empty cache
  (3) lazy+trace    as (2), the image carrying the application's trace layer, which the FUSE
                    server replays in the background from the moment it mounts; empty cache
  (4) warm          as (3) over the chunk cache (3) filled

The page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every case, so
cold is cold and warm means "chunks on the node's disk". Time runs from the first byte of the
pull to the first useful output: the line ``ready`` of
``python3 -c 'import json, sqlite3, email; print("ready")'``, or the first answer of
``python3 -m http.server`` to ``GET /etc/os-release`` (polled from the host every 10 ms).
Applications run in their own mount and PID namespaces (``unshare``) with /proc and /dev.

Bytes fetched before ready are counted on the link itself (the host side of the veth:
everything the registry sent, headers included) at the moment of ready; "% of image" is that
over the image's stored size in its own format (the gzip layer for (1), the lz4 block layer for
(2)-(4)). Tidal's own count of payload bytes (``image_stats``) is in the JSON too.

Needs root (namespaces, tc, FUSE, loop devices), debootstrap, skopeo, docker-registry. Cleans up
every mount, loop device, namespace, registry process and temporary directory it creates, also
on failure and Ctrl-C.

Every case runs ``--repeat`` times (default 3, interleaved); the table shows the median run.
A third application, ``pandas`` (``python3 -c 'import numpy, scipy.linalg, pandas;
print("ready")'``), needs much more of the image. The default run (two rates, three
applications) takes about 11 minutes once the tree is cached; ``--quick`` is 100 Mbit/s, the
python one-liner, one run.

    .venv/bin/python benchmarks/bench_lazy_start.py [--rates 100,1000] [--apps python,http,pandas]
        [--repeat 3] [--quick] [--rootfs DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _lazy import (
    APPS,
    ARTIFACTS,
    MIN_IMAGE_BYTES,
    MIRROR,
    PACKAGES,
    ROOTFS,
    App,
    Artifacts,
    BenchError,
    Env,
    Row,
    case_baseline,
    case_tidal,
    ensure_artifacts,
    ensure_rootfs,
    host_interface,
    publish,
    sigterm_as_interrupt,
    work_dir,
)
from tidal.cli.console import out as stdout_console
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer

RESULTS = Path(__file__).parent / "results" / "lazy_start.json"
CASES = ("baseline", "lazy cold", "lazy+trace", "warm")
CASE_TITLES = {
    "baseline": "(1) pull + unpack",
    "lazy cold": "(2) lazy, cold",
    "lazy+trace": "(3) lazy + trace, cold",
    "warm": "(4) lazy, warm cache",
}


def measure_app(env: Env, app: App, rep: int) -> dict[str, Row]:
    tag = f"{app.name}-{rep}"
    rows: dict[str, Row] = {}
    rows["baseline"] = case_baseline(env, app, tag)
    cold, traced = env.work / f"cache-{tag}-cold", env.work / f"cache-{tag}-trace"
    try:
        rows["lazy cold"] = case_tidal(env, app, "plain", cold, f"{tag}-cold")
        rows["lazy+trace"] = case_tidal(env, app, app.name, traced, f"{tag}-trace")
        rows["warm"] = case_tidal(env, app, app.name, traced, f"{tag}-warm")
    finally:
        shutil.rmtree(cold, ignore_errors=True)
        shutil.rmtree(traced, ignore_errors=True)
    return rows


def summarise(runs: list[dict[str, Row]], art: Artifacts) -> dict[str, dict[str, Any]]:
    """Per case: the median run (by time) of the repetitions, with ratios to the baseline."""
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        rows = sorted((r[case] for r in runs), key=lambda r: r.time_s)
        med = rows[(len(rows) - 1) // 2]
        image_bytes = art.oci_bytes if case == "baseline" else art.tidal_bytes
        out[case] = {
            "time_s": med.time_s,
            "time_s_all": [r.time_s for r in rows],
            "fetch_s": med.fetch_s,
            "prepare_s": med.prepare_s,
            "run_s": med.run_s,
            "wire_bytes_before_ready": med.wire_bytes_ready,
            "payload_bytes_before_ready": med.payload_bytes,
            "wire_bytes_total": med.wire_bytes_total,
            "image_bytes": image_bytes,
            "fraction_of_image_before_ready": med.wire_bytes_ready / image_bytes,
            **({"detail": med.extra} if med.extra else {}),
        }
    base = out["baseline"]
    for row in out.values():
        row["speedup_vs_baseline"] = base["time_s"] / row["time_s"] if row["time_s"] else 0.0
        row["bytes_vs_baseline"] = (
            row["wire_bytes_before_ready"] / base["wire_bytes_before_ready"]
            if base["wire_bytes_before_ready"]
            else 0.0
        )
    return out


def print_table(
    console: Console, label: str, per_app: dict[str, dict[str, dict[str, Any]]]
) -> None:
    table = Table(title=f"time to first useful output, registry behind {label}")
    for col in ("app", "case", "total s", "pull s", "unpack/mount s", "run s",
                "MB before ready", "% of image", "speed-up vs (1)", "bytes vs (1)"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("app", "case") else "right")
    for app_name, cases in per_app.items():
        for case, r in cases.items():
            table.add_row(
                app_name if case == "baseline" else "",
                CASE_TITLES[case],
                f"{r['time_s']:.2f}",
                f"{r['fetch_s']:.2f}",
                f"{r['prepare_s']:.2f}",
                f"{r['run_s']:.2f}",
                f"{r['wire_bytes_before_ready'] / 1e6:.1f}",
                f"{r['fraction_of_image_before_ready']:.1%}",
                "1.0x" if case == "baseline" else f"{r['speedup_vs_baseline']:.1f}x",
                f"{r['bytes_vs_baseline']:.3f}",
                end_section=case == CASES[-1],
            )
    console.print(table)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog=f"The Debian tree is cached in {ROOTFS}, the images built from it in "
        f"{ARTIFACTS}/; delete them (or --rebuild) to start over.",
    )
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s (default 100,1000)")
    ap.add_argument("--apps", default=",".join(APPS), help=f"of {','.join(APPS)} (all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every case; the median counts")
    ap.add_argument("--quick", action="store_true", help="100 Mbit/s, the python app, one run")
    ap.add_argument("--rootfs", type=Path, help="use this root tree instead of the cached one")
    ap.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached images")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per step")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_lazy_start needs root (netns, tc, FUSE, loop devices)", file=sys.stderr)
        return 1
    for tool in ("skopeo", "docker-registry", "unshare", "chroot", "tc"):
        if shutil.which(tool) is None:
            print(f"bench_lazy_start needs {tool}; run `sudo make deps`", file=sys.stderr)
            return 1
    if args.quick:
        args.rates, args.apps, args.repeat = "100", "python", 1
    rates = [float(r) for r in args.rates.split(",") if r]
    apps = [APPS[a] for a in args.apps.split(",") if a]
    console = stdout_console
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)

    rootfs = ensure_rootfs(args.rootfs, args.mirror, console)
    results: dict[str, Any] = {
        "benchmark": "lazy_start",
        "argv": sys.argv[1:],
        "repeat": args.repeat,
        "links": {},
    }
    failed = False
    with work_dir() as work:
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        art = ensure_artifacts(rootfs, args.rebuild, console)
        if art.rootfs_bytes < MIN_IMAGE_BYTES:
            console.print(f"[yellow]warning: {rootfs} holds only {art.rootfs_bytes / 1e6:.0f} MB")
        console.print(
            f"image: {rootfs}, {art.rootfs_bytes / 1e6:.0f} MB of files; gzip OCI layer "
            f"{art.oci_bytes / 1e6:.0f} MB; Tidal lz4 layer {art.tidal_bytes / 1e6:.0f} MB"
        )
        results["image"] = {
            "rootfs": str(rootfs),
            "packages": list(PACKAGES) if args.rootfs is None else None,
            "rootfs_bytes": art.rootfs_bytes,
            "oci_gzip_layer_bytes": art.oci_bytes,
            "tidal_layer_bytes": art.tidal_bytes,
        }
        results["apps"] = {a.name: a.description for a in apps}
        results["traces"] = publish(art, work, apps, args.timeout_s, console)
        for rate in rates:
            label = f"{rate:g} Mbit/s"
            with contextlib.ExitStack() as stack:
                link = stack.enter_context(ThrottledLink(rate))
                server = stack.enter_context(
                    RegistryServer(
                        storage_dir=work / "registry", host=link.ns_address, wrap=link.exec_prefix
                    )
                )
                os.environ["TIDAL_BLOBS__INSECURE_REGISTRIES"] = server.address
                env = Env(work, server.address, host_interface(link), art, args.timeout_s)
                per_app: dict[str, dict[str, dict[str, Any]]] = {}
                for app in apps:
                    runs = []
                    for rep in range(args.repeat):
                        console.print(f"{label}: {app.name}, run {rep + 1}/{args.repeat}")
                        try:
                            runs.append(measure_app(env, app, rep))
                        except BenchError as exc:
                            console.print(f"[red]{label} {app.name}: {exc}")
                            failed = True
                    if runs:
                        per_app[app.name] = summarise(runs, art)
            results["links"][label] = per_app
            print_table(console, label, per_app)

    for label, per_app in results["links"].items():
        for app_name, cases in per_app.items():
            lazy = cases["lazy cold"]
            console.print(
                f"{label} {app_name}: lazy cold {lazy['speedup_vs_baseline']:.1f}x, with trace "
                f"{cases['lazy+trace']['speedup_vs_baseline']:.1f}x faster than pull+unpack; "
                f"{lazy['fraction_of_image_before_ready']:.1%} / "
                f"{cases['lazy+trace']['fraction_of_image_before_ready']:.1%} of the image "
                "fetched before ready"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench created was removed", file=sys.stderr)
        sys.exit(130)
