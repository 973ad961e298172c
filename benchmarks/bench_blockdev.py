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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tidal.blockdev import mounts
from tidal.blockdev.builder import build_from_dir
from tidal.blockdev.rawdisk import export_raw
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--random-reads", type=int, default=4000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_blockdev needs root (FUSE, loop devices, drop_caches)", file=sys.stderr)
        return 1
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
