"""FUSE block device vs a raw disk file: sequential MB/s and random 4 KiB IOPS, cold and warm.

The image: a Debian minbase root filesystem (see bench_convert.py; reused from
/var/cache/tidal-bench/) built into a Tidal image (lz4 ZFile layer). Tidal's figure is read
from the mounted image's loop device (loop -> FUSE file -> ZFile layer -> blob file), i.e.
exactly what ext4 sees. The baseline is the same bytes (``export-raw``) read from a raw
file on the same disk. Both read exactly the same ranges: the data extents of the image (the
holes of a virtual disk are free for both and would flatter the numbers).

Cold = after ``echo 3 > /proc/sys/vm/drop_caches``; warm = the same reads again. Random reads
use ``POSIX_FADV_RANDOM`` (no readahead) on both sides. Run as root.

    .venv/bin/python benchmarks/bench_blockdev.py [--random-reads 4000]

``--servers``: two FUSE servers side by side on the same device in the same run: the per-mount
server process (``serve.py``, the row still named ``mfusepy``: it served through mfusepy/libfuse
until commit 14c2970, when the figures in the README and ``results/blockdev_servers.json``
were measured; it now serves a FuseDisk too, so today both rows measure FuseDisk) and
``fuse_ll.FuseDisk`` in a process of the bench's own. The device is the merged view of a
Tidal image of the 1.3 GB Debian/python root filesystem (``rootfs-bookworm-lazy``, lz4),
its blob files warm in the page cache, so what differs is the FUSE server alone. Reads
bypass every cache above the server: O_DIRECT on ``<mnt>/disk`` and on the loop device
(sequential 1 MiB over the data extents; 4 KiB random, one thread for latency, eight for
IOPS), and every regular file of a freshly mounted ext4 read once (one thread). The
servers' CPU seconds are read from ``/proc/<pid>/stat``. No ``drop_caches`` (other
benchmarks may run on the machine). Writes ``results/blockdev_servers.json``.

    .venv/bin/python benchmarks/bench_blockdev.py --servers [--rounds 2] [--random-reads 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tidal.blockdev import ext4, fuse_ll, loop, mounts
from tidal.blockdev.builder import build_from_dir
from tidal.blockdev.fuse_ll import FuseDisk
from tidal.blockdev.rawdisk import export_raw
from tidal.errors import MountError
from tidal.image.manifest import Image
from tidal.units import SECTOR_BYTES

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import CACHE, ensure_rootfs

RESULTS = Path(__file__).parent / "results" / "blockdev.json"
IMAGE = CACHE / "image-minbase-lz4"
SEQ_IO = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def data_ranges(image_dir: Path) -> list[tuple[int, int]]:
    """Byte ranges holding data in any layer, merged, in LBA order."""
    spans = sorted(
        (e.lba_sectors * SECTOR_BYTES, (e.lba_sectors + e.length_sectors) * SECTOR_BYTES)
        for layer in Image.open(image_dir).layers()
        for e in layer.index
        if not e.zeroed
    )
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def sequential(path: str, ranges: list[tuple[int, int]]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        total = 0
        for a, b in ranges:
            off = a
            while off < b:
                n = min(SEQ_IO, b - off)
                total += len(os.pread(fd, n, off))
                off += n
        return total / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def random_reads(path: str, offsets: list[int], threads: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        t0 = time.perf_counter()
        if threads == 1:
            for off in offsets:
                os.pread(fd, 4096, off)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda off: os.pread(fd, 4096, off), offsets, chunksize=64))
        return len(offsets) / (time.perf_counter() - t0)
    finally:
        os.close(fd)


SERVERS_RESULTS = Path(__file__).parent / "results" / "blockdev_servers.json"
SERVERS_TREE = CACHE / "rootfs-bookworm-lazy"
SERVERS_IMAGE = CACHE / "fuse" / "image-bookworm-lz4"


def serve_fuse_ll(image: Path, mnt: Path, options: dict[str, int]) -> int:
    """The FuseDisk side of ``--servers``: serve ``image`` at ``mnt`` until SIGTERM."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the threads inherit it
    disk = FuseDisk.mount(Image.open(image).merged_view(), mnt, name="bench", **options)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    try:
        disk.close()
    except MountError as exc:  # leave nothing mounted behind a benchmark
        print(f"{exc} (held by: {holders(mnt) or 'no open file found'}); unmounting lazily",
              file=sys.stderr)  # fmt: skip
        fuse_ll.umount(mnt, lazy=True)
        disk.close(unmount=False)
    return 0


def holders(mnt: Path) -> list[str]:
    """Processes with a file open below ``mnt`` and loop devices backed there (what makes an
    unmount busy)."""
    found = [f"{d.device} -> {d.backing_file}" for d in loop.list_devices()
             if d.backing_file.startswith(str(mnt))]  # fmt: skip
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(str(mnt)):
                        found.append(
                            f"pid {proc_dir.name} ({(proc_dir / 'comm').read_text().strip()})"
                        )
    return found


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants


def direct_sequential(path: str, ranges: list[tuple[int, int]]) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = _aligned(SEQ_IO)
    try:
        t0 = time.perf_counter()
        total = 0
        for a, b in ranges:
            off = a - a % 4096
            while off < b:
                n = min(SEQ_IO, -(-(b - off) // 4096) * 4096)
                total += os.preadv(fd, [memoryview(buf)[:n]], off)
                off += n
        return total / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)
        buf.close()


def direct_random(path: str, offsets: list[int], threads: int) -> tuple[float, list[float]]:
    """IOPS and (one thread) each read's latency in seconds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    local = threading.local()

    def one(off: int) -> float:
        if not hasattr(local, "buf"):
            local.buf = _aligned(4096)
        t = time.perf_counter()
        os.preadv(fd, [local.buf], off)
        return time.perf_counter() - t

    try:
        t0 = time.perf_counter()
        if threads == 1:
            lat = [one(off) for off in offsets]
        else:
            with ThreadPoolExecutor(threads) as pool:
                lat = list(pool.map(one, offsets, chunksize=16))
        return len(offsets) / (time.perf_counter() - t0), lat
    finally:
        os.close(fd)


def read_tree(root: Path) -> float:
    t0 = time.perf_counter()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e6


@contextlib.contextmanager
def served(server: str, image: Path, work: Path) -> Iterator[tuple[str, str, int, Path]]:
    """(disk file, loop device, server pid, ext4 mount) of ``image`` behind ``server``."""
    target = work / f"root-{server.split()[0]}"
    target.mkdir(exist_ok=True)
    if server == "mfusepy":
        info = mounts.mount_image(image, target)
        try:
            yield info.disk_file, str(info.loop_device), info.server_pid, target
        finally:
            mounts.unmount(target)
        return
    mnt = Path(tempfile.mkdtemp(prefix="fuse-ll-", dir=work))
    options = server.partition(" ")[2]  # "fuse_ll threads=2,max_background=12"
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-fuse-ll", str(image), str(mnt), options],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit("the FuseDisk server did not start")
    try:
        lo = loop.attach(mnt / "disk", readonly=True, direct_io=True)
        try:
            ext4.mount(lo.device, target, readonly=True)
            try:
                yield str(mnt / "disk"), lo.device, child.pid, target
            finally:
                ext4.umount(target)
        finally:
            loop.detach(lo.device)
            deadline = time.monotonic() + 30  # the loop device lets go when udev is done
            while time.monotonic() < deadline and any(
                d.backing_file == str(mnt / "disk") for d in loop.list_devices()
            ):
                time.sleep(0.1)
    finally:
        child.terminate()
        child.wait(30)
        child.stdout.close()


def measure(server: str, image: Path, work: Path, ranges: list[tuple[int, int]],
            offsets: list[int]) -> dict[str, float]:  # fmt: skip
    with served(server, image, work) as (disk, loopdev, pid, target):
        row: dict[str, float] = {}
        cpu0 = cpu_s(pid)
        row["ext4_files_cold_mb_s"] = read_tree(target)
        row["disk_seq_mb_s"] = direct_sequential(disk, ranges)
        row["loop_seq_mb_s"] = direct_sequential(loopdev, ranges)
        for name, path in (("disk", disk), ("loop", loopdev)):
            _iops, lat = direct_random(path, offsets, 1)
            lat.sort()
            row[f"{name}_rand4k_p50_us"] = lat[len(lat) // 2] * 1e6
            row[f"{name}_rand4k_p99_us"] = lat[len(lat) * 99 // 100] * 1e6
            row[f"{name}_rand4k_iops_t8"] = direct_random(path, offsets, 8)[0]
        row["server_cpu_s"] = cpu_s(pid) - cpu0
        return row


def compare_servers(rounds: int, random_reads: int, variants: list[str]) -> int:
    if not (SERVERS_IMAGE / "manifest.json").exists():
        print(f"building {SERVERS_IMAGE} from {SERVERS_TREE} (lz4) ...", flush=True)
        build_from_dir(SERVERS_TREE, SERVERS_IMAGE, codec="lz4")
    for blob in SERVERS_IMAGE.rglob("*"):  # warm: the servers, not the disk, are measured
        if blob.is_file():
            blob.read_bytes()
    ranges = data_ranges(SERVERS_IMAGE)
    data_bytes = sum(b - a for a, b in ranges)
    rnd = random.Random(42)
    offsets = [
        a - a % 4096 + rnd.randrange(0, max(1, (b - a) // 4096)) * 4096
        for a, b in rnd.choices(ranges, weights=[b - a for a, b in ranges], k=random_reads)
    ]
    runs: dict[str, list[dict[str, float]]] = {"mfusepy": [], "fuse_ll": []}
    runs.update({f"fuse_ll {v}": [] for v in variants})
    with tempfile.TemporaryDirectory(prefix="tidal-bench-servers-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        for r in range(rounds):
            for server in runs if r % 2 == 0 else reversed(list(runs)):
                runs[server].append(measure(server, SERVERS_IMAGE, work, ranges, offsets))
                print(f"round {r + 1} {server}: {runs[server][-1]}", flush=True)
    lower_is_better = ("_us", "_cpu_s")
    best = {
        s: {
            k: (min if k.endswith(lower_is_better) else max)(row[k] for row in rows)
            for k in rows[0]
        }
        for s, rows in runs.items()
    }
    ratios = {k: best["fuse_ll"][k] / best["mfusepy"][k] for k in best["fuse_ll"]}
    print(f"input: {SERVERS_TREE.name} as a Tidal image (lz4), {data_bytes / 1e6:.0f} MB of "
          f"data extents; best of {rounds} rounds")  # fmt: skip
    print(f"{'':28}" + "".join(f"{s:>24}" for s in best) + f"{'fuse_ll / mfusepy':>20}")
    for k in best["fuse_ll"]:
        print(f"{k:28}" + "".join(f"{b[k]:24.1f}" for b in best.values()) + f"{ratios[k]:20.2f}")
    out = (
        SERVERS_RESULTS.with_name("blockdev_servers_variants.json") if variants else SERVERS_RESULTS
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "blockdev_servers",
                "input": f"{SERVERS_TREE.name} (lz4 Tidal image, blobs warm)",
                "data_bytes": data_bytes,
                "random_reads": random_reads,
                "rounds": runs,
                "best": best,
                "ratios_fuse_ll_over_mfusepy": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--random-reads", type=int, default=4000)
    ap.add_argument("--servers", action="store_true", help="mfusepy vs FuseDisk, same device")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--fuse-ll-variants",
        default="",
        help="more FuseDisk rows, ';'-separated, e.g. 'threads=1;threads=8;max_background=12'",
    )
    ap.add_argument("--serve-fuse-ll", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_fuse_ll:
        image, mnt, opts = args.serve_fuse_ll
        options = {k: int(v) for k, _, v in (o.partition("=") for o in opts.split(",") if o)}
        return serve_fuse_ll(Path(image), Path(mnt), options)
    if os.geteuid() != 0:
        print("bench_blockdev needs root (FUSE, loop devices, drop_caches)", file=sys.stderr)
        return 1
    if args.servers:
        variants = [v.strip() for v in args.fuse_ll_variants.split(";") if v.strip()]
        return compare_servers(args.rounds, min(args.random_reads, 3000), variants)
    tree, what = ensure_rootfs()
    with tempfile.TemporaryDirectory(prefix="tidal-bench-blockdev-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        if not (IMAGE / "manifest.json").exists():
            build_from_dir(tree, IMAGE, codec="lz4")
        raw = work / "disk.raw"
        export_raw(IMAGE, raw)
        ranges = data_ranges(IMAGE)
        data_bytes = sum(b - a for a, b in ranges)
        rnd = random.Random(42)
        weights = [b - a for a, b in ranges]
        offsets = []
        for a, b in rnd.choices(ranges, weights=weights, k=args.random_reads):
            offsets.append(a + rnd.randrange(0, max(1, (b - a) // 4096)) * 4096)
        mnt = work / "mnt"
        info = mounts.mount_image(IMAGE, mnt)
        rows = []
        try:
            targets = {"tidal (loop -> FUSE -> ZFile)": str(info.loop_device), "raw file": str(raw)}
            for name, path in targets.items():
                row: dict[str, object] = {"target": name}
                drop_caches()
                row["seq_cold_mb_s"] = sequential(path, ranges)
                row["seq_warm_mb_s"] = sequential(path, ranges)
                for threads in (1, 8):
                    drop_caches()
                    row[f"rand4k_cold_iops_t{threads}"] = random_reads(path, offsets, threads)
                    row[f"rand4k_warm_iops_t{threads}"] = random_reads(path, offsets, threads)
                rows.append(row)
        finally:
            mounts.unmount(mnt)
    tidal, base = rows
    ratios = {k: float(tidal[k]) / float(base[k]) for k in tidal if k != "target"}  # type: ignore[arg-type]
    cols = [k for k in tidal if k != "target"]
    print(f"input: Tidal image of {what}; {data_bytes / 1e6:.0f} MB of data extents read")
    print(f"{'':32}" + "".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(f"{r['target']:32}" + "".join(f"{float(r[c]):22.0f}" for c in cols))  # type: ignore[arg-type]
    print(f"{'ratio tidal / raw':32}" + "".join(f"{ratios[c]:22.2f}" for c in cols))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "blockdev",
                "input": what,
                "data_bytes": data_bytes,
                "random_reads": args.random_reads,
                "rows": rows,
                "ratios_tidal_over_raw": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
