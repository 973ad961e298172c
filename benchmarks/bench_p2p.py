"""P2P scale-out: N hosts start the same image at once behind a registry with a slow uplink.

Hosts are network namespaces on a bridge (full speed between them); the CNCF registry runs in
its own namespace whose outgoing traffic is shaped to ``--rate`` Mbit/s (a registry or WAN
link shared by the whole fleet). Every host pulls the image (metadata only), mounts it lazily,
and then all hosts read the same file at the same moment. Two cases, same run, fresh caches:
  * registry only (the baseline: every host fetches its chunks from the registry);
  * P2P (``[blobs] p2p_roots`` set; one root): the hosts form the layer's tree, the first reads
    from the registry, the others from their parents.
Reported: seconds until every host has read the file, and the bytes that left the registry
(counted on its interface). Needs root, FUSE, loop devices, iproute2, nsenter.

Usage: .venv/bin/python benchmarks/bench_p2p.py [--hosts 6] [--rate 100] [--file-mib 24]
Writes benchmarks/results/p2p.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from tidal.blobs.distribution import push_image  # noqa: E402
from tidal.blobs.p2p import RootServer  # noqa: E402
from tidal.blobs.reference import ImageReference  # noqa: E402
from tidal.blobs.registry_client import RegistryClient  # noqa: E402
from tidal.blobs.settings import BlobSettings  # noqa: E402
from tidal.blockdev.builder import build_from_dir  # noqa: E402
from tidal.cli.demo import make_sample_rootfs  # noqa: E402
from tidal.service.auth import ClusterToken  # noqa: E402
from tidal.testing.network import BridgeNetwork  # noqa: E402
from tidal.testing.registry_server import RegistryServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "p2p.json"


def tx_bytes(netns: str) -> int:
    """Bytes sent by the namespace's interfaces (the registry's uplink)."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-s", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return sum(i["stats64"]["tx"]["bytes"] for i in json.loads(out) if i["ifname"] != "lo")


def tidal(netns: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [*BridgeNetwork.net_prefix(netns), sys.executable, "-m", "tidal.cli.main", *args],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"tidal {' '.join(args)} in {netns}: {proc.stderr.strip()}")
    return proc.stdout


def run_case(
    name: str,
    hosts: list[str],
    ref: str,
    registry: RegistryServer,
    reg_ns: str,
    work: Path,
    roots: str | None,
    rel: str,
    expected: bytes,
) -> dict[str, object]:
    mounts: list[tuple[str, dict[str, str], Path]] = []
    try:
        for i, ns in enumerate(hosts):
            root = work / name / f"host{i}"
            env = {
                **os.environ,
                "TIDAL_DATA_ROOT": str(root),
                "TIDAL_BLOBS__INSECURE_REGISTRIES": registry.address,
            }
            if roots:
                env["TIDAL_BLOBS__P2P_ROOTS"] = roots
                env["TIDAL_BLOBS__P2P_TOKEN_FILE"] = str(work / "cluster.token")
            tidal(ns, env, "image", "pull", ref, str(root / "pulled"))
            tidal(ns, env, "image", "mount", str(root / "pulled"), str(root / "mnt"))
            mounts.append((ns, env, root / "mnt"))
        before = tx_bytes(reg_ns)
        done: dict[int, float] = {}
        bad: list[int] = []
        start = threading.Barrier(len(mounts) + 1)

        def read(i: int, target: Path) -> None:
            start.wait()
            data = (target / rel).read_bytes()
            done[i] = time.perf_counter()
            if data != expected:
                bad.append(i)

        threads = [threading.Thread(target=read, args=(i, m[2])) for i, m in enumerate(mounts)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if bad:
            raise SystemExit(f"{name}: hosts {bad} read wrong bytes")
        egress = tx_bytes(reg_ns) - before
        times = sorted(t - t0 for t in done.values())
        return {
            "case": name,
            "hosts": len(mounts),
            "all_read_s": times[-1],
            "first_read_s": times[0],
            "registry_egress_bytes": egress,
        }
    finally:
        for ns, env, target in mounts:
            subprocess.run(
                [*BridgeNetwork.net_prefix(ns), sys.executable, "-m", "tidal.cli.main",
                 "image", "umount", "--force", str(target)],
                env=env, capture_output=True, check=False,
            )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=6)
    ap.add_argument("--rate", type=float, default=100.0, help="registry uplink, Mbit/s")
    ap.add_argument("--file-mib", type=int, default=24)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_p2p needs root (network namespaces, FUSE, loop devices)", file=sys.stderr)
        return 1
    data = os.urandom(args.file_mib << 20)
    rel = "app/payload.bin"
    with tempfile.TemporaryDirectory(prefix="tidal-bench-p2p-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        make_sample_rootfs(tree)
        (tree / rel).write_bytes(data)
        os.environ["TIDAL_DATA_ROOT"] = str(work / "build")
        image = build_from_dir(tree, work / "image").image_dir
        with BridgeNetwork() as net:
            reg_ns, reg_addr = net.add_host(rate_mbit=args.rate)
            hosts = [net.add_host()[0] for _ in range(args.hosts)]
            registry = RegistryServer(host=reg_addr, wrap=["ip", "netns", "exec", reg_ns]).start()
            token_file = work / "cluster.token"
            token_file.write_text(ClusterToken.generate())
            token_file.chmod(0o600)
            root = RootServer(net.gateway, 0, token=ClusterToken.from_file(token_file)).start()
            try:
                ref = f"{registry.address}/bench/p2p:v1"
                insecure = BlobSettings(insecure_registries=(registry.address,))
                with RegistryClient(registry.address, settings=insecure) as client:
                    push_image(image, ImageReference.parse(ref), client)
                rows = [
                    run_case("registry only", hosts, ref, registry, reg_ns, work, None, rel, data),
                    run_case("p2p", hosts, ref, registry, reg_ns, work, root.url, rel, data),
                ]
            finally:
                root.stop()
                registry.stop()
    base = rows[0]
    for r in rows:
        r["time_vs_registry_only"] = float(r["all_read_s"]) / float(base["all_read_s"])  # type: ignore[arg-type]
        r["egress_vs_registry_only"] = int(r["registry_egress_bytes"]) / max(  # type: ignore[call-overload]
            1,
            int(base["registry_egress_bytes"]),  # type: ignore[call-overload]
        )
    print(
        f"{args.hosts} hosts read a {args.file_mib} MiB file at once; registry uplink "
        f"{args.rate:g} Mbit/s"
    )
    print(
        f"{'case':15} {'all read s':>10} {'first s':>8} {'registry MB':>12} {'time x':>7} {'egress x':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:15} {r['all_read_s']:10.2f} {r['first_read_s']:8.2f} "
            f"{int(r['registry_egress_bytes']) / 1e6:12.1f} {r['time_vs_registry_only']:7.2f} "  # type: ignore[call-overload]
            f"{r['egress_vs_registry_only']:9.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "p2p_scale_out",
        "hosts": args.hosts,
        "registry_uplink_mbit": args.rate,
        "file_bytes": len(data),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
