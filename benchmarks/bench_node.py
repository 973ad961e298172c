"""Time to mount an image and read a file from it: the node service against a server per mount.

The image: the demo's busybox tree plus a 1 MiB file, as a Tidal block image on local disk
(no registry: this isolates the mount path, not the fetch). Each case mounts it at a fresh
target, reads ``/etc/os-release``-like file ``data/first.bin`` (page cache dropped first), and
unmounts; the time is from the mount request to the last byte of that file.

  (1) kernel floor     ``mount -o loop,ro`` of the same ext4 as a raw file (``export-raw``):
                       what a mount costs with no user-space block device at all
  (2) process/mount    ``tidal image mount`` with no node service: the CLI, then a FUSE server
                       process of the mount's own (mfusepy), loop, ext4
  (3) node service     ``tidal image mount`` while ``tidal node serve`` runs: the CLI asks the
                       service, which serves the disk from its threads (FuseDisk)
  (4) in-process API   ``mount_image`` in this process: server process per mount (what the
                       engine daemon did)
  (5) node, in-process ``NodeService.mount`` in this process (what the node service does per
                       request, without the CLI and the socket)

Interleaved, ``--repeat`` runs each (default 10); the table shows the median and the ratio to
(2). Writes benchmarks/results/node.json. Needs root (FUSE, loop devices).

    .venv/bin/python benchmarks/bench_node.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tidal.blockdev import mounts
from tidal.blockdev.builder import build_from_dir
from tidal.blockdev.fdstore import FdStore
from tidal.blockdev.rawdisk import export_raw
from tidal.cli.demo import make_sample_rootfs
from tidal.node.service import NodeService
from tidal.testing.node import NodeProcess

RESULTS = Path(__file__).parent / "results" / "node.json"
FILE = "data/first.bin"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> int:
    with path.open("rb", buffering=0) as f:
        n = 0
        while b := f.read(1 << 20):
            n += len(b)
    return n


def tidal(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "tidal.cli.main", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    data_root = work / "data"
    os.environ["TIDAL_DATA_ROOT"] = str(data_root)
    env = {**os.environ}
    root = work / "root"
    make_sample_rootfs(root)
    (root / "data").mkdir()
    (root / FILE).write_bytes(os.urandom(1 << 20))
    image = build_from_dir(root, work / "image").image_dir
    raw = work / "disk.raw"
    export_raw(image, raw)
    node = NodeProcess(data_root)
    local = NodeService(fdstore=FdStore.ensure(mounts.fdstore_path()))
    times: dict[str, list[float]] = {}

    def case(name: str, mount: Callable[[Path], None], unmount: Callable[[Path], None]) -> None:
        target = work / "mnt"
        target.mkdir(exist_ok=True)
        drop_caches()
        t0 = time.perf_counter()
        mount(target)
        assert read_all(target / FILE) == 1 << 20
        times.setdefault(name, []).append(time.perf_counter() - t0)
        unmount(target)

    def loop_mount(t: Path) -> None:
        subprocess.run(["mount", "-o", "loop,ro", str(raw), str(t)], check=True)

    def loop_umount(t: Path) -> None:
        subprocess.run(["umount", str(t)], check=True)

    try:
        for _ in range(args.repeat):
            case("kernel floor (mount -o loop)", loop_mount, loop_umount)
            case(
                "tidal image mount, process per mount",
                lambda t: tidal("image", "mount", str(image), str(t), env=env),
                lambda t: tidal("image", "umount", str(t), env=env),
            )
            node.start()
            case(
                "tidal image mount, node service",
                lambda t: tidal("image", "mount", str(image), str(t), env=env),
                lambda t: tidal("image", "umount", str(t), env=env),
            )
            node.kill(15)
            case(
                "mount_image in-process, process per mount",
                lambda t: (mounts.mount_image(image, t), None)[1],
                lambda t: mounts.unmount(t),
            )
            case(
                "NodeService.mount in-process",
                lambda t: (local.mount(str(image), str(t)), None)[1],
                lambda t: local.unmount(str(t)),
            )
    finally:
        for m in mounts.list_mounts():
            mounts.unmount(m.target, force=True)
        node.close()
    base = statistics.median(times["tidal image mount, process per mount"])
    rows = []
    print(f"{'case':<44} {'median ms':>10} {'vs process/mount':>17}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": name, "median_s": med, "all_s": ts, "ratio_to_process": med / base})
        print(f"{name:<44} {med * 1000:>10.1f} {med / base:>16.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "node", "repeat": args.repeat, "cases": rows},
                                  indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
