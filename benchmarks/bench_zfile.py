"""ZFile compress/decompress throughput beside the plain codec on the same bytes.

Input: a real root filesystem image — an ext4 disk made with ``mkfs.ext4 -d`` from a slice of
this machine's /usr (binaries, libraries, text), so the bytes look like a container image.
Baseline: the same codec called on the same 64 KiB chunks with no container format, so the
table shows what the format itself costs (framing, checksums, table, Python per-chunk calls).

    .venv/bin/python benchmarks/bench_zfile.py [--size-mb 192] [--chunk-kb 64]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import lz4.block
import zstandard

from tidal.image.source import BytesSource
from tidal.image.zfile import ZFileReader, ZFileWriter

RESULTS = Path(__file__).parent / "results" / "zfile.json"
SOURCE_DIRS = ["/usr/bin", "/usr/lib/python3", "/usr/lib/x86_64-linux-gnu", "/usr/share"]


def make_rootfs_image(size_mb: int, workdir: Path) -> bytes:
    """An ext4 image of about ``size_mb`` MiB filled from /usr; falls back to a tar of it."""
    tree = workdir / "tree"
    tree.mkdir()
    budget = size_mb * (1 << 20) * 0.7
    used = 0
    for d in SOURCE_DIRS:
        for p in sorted(Path(d).rglob("*")):
            if used >= budget:
                break
            if p.is_file() and not p.is_symlink():
                try:
                    dst = tree / p.relative_to("/")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, dst)
                    used += p.stat().st_size
                except OSError:
                    continue
    du_kib = int(
        subprocess.run(
            ["du", "-sk", str(tree)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    fs_mb = max(size_mb, int(du_kib / 1024 * 1.4) + 32)
    img = workdir / "rootfs.ext4"
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run(
        [
            mkfs,
            "-q",
            "-F",
            "-i",
            "8192",
            "-d",
            str(tree),
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            str(img),
            f"{fs_mb}M",
        ],
        capture_output=True,
        check=True,
    )
    return img.read_bytes()


def plain_codec(data: bytes, chunk: int, codec: str) -> tuple[float, float, int]:
    if codec == "lz4":
        comp = lambda b: lz4.block.compress(b, store_size=False)  # noqa: E731
        decomp = lambda b, n: lz4.block.decompress(b, uncompressed_size=n)  # noqa: E731
    else:
        zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        comp = zc.compress
        decomp = lambda b, n: zd.decompress(b, max_output_size=n)  # noqa: E731
    t0 = time.perf_counter()
    chunks = [comp(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    t1 = time.perf_counter()
    for i, c in enumerate(chunks):
        decomp(c, min(chunk, len(data) - i * chunk))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, sum(len(c) for c in chunks)


def zfile_codec(data: bytes, chunk: int, codec: str) -> tuple[float, float, int, float]:
    buf = io.BytesIO()
    t0 = time.perf_counter()
    w = ZFileWriter(buf, chunk_size_bytes=chunk, codec=codec)
    step = 1 << 20
    for i in range(0, len(data), step):
        w.write(data[i : i + step])
    w.close()
    t1 = time.perf_counter()
    blob = buf.getvalue()
    r = ZFileReader(BytesSource(blob), decoded_cache_chunks=0)
    for i in range(0, len(data), step):
        r.read(i, min(step, len(data) - i))
    t2 = time.perf_counter()
    # random 4 KiB reads: what a lazily mounted disk does
    import random

    rnd = random.Random(7)
    n = 2000
    t3 = time.perf_counter()
    for _ in range(n):
        off = rnd.randrange(0, len(data) - 4096)
        r.read(off, 4096)
    t4 = time.perf_counter()
    return t1 - t0, t2 - t1, len(blob), n / (t4 - t3)


def chunk_checks(data: bytes, chunk: int) -> dict[str, float]:
    """MB/s of each way to check a stored (lz4) chunk, beside decompressing it: what a lazy
    read pays per chunk for its integrity check (crc32: no defence; sha256, BLAKE3: digests)."""
    import hashlib

    stored = [
        lz4.block.compress(data[i : i + chunk], store_size=False)
        for i in range(0, len(data), chunk)
    ]
    total_mb = sum(len(s) for s in stored) / (1 << 20)
    checks: dict[str, object] = {
        "crc32": zlib.crc32,
        "sha256": lambda b: hashlib.sha256(b).digest(),
    }
    try:
        import blake3

        checks["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        print("blake3 not installed (pip install blake3, the bench extra): its row is skipped")
    out: dict[str, float] = {}
    for name, fn in checks.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for s in stored:
                fn(s)  # type: ignore[operator]
            best = min(best, time.perf_counter() - t0)
        out[name] = total_mb / best
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i, s in enumerate(stored):
            lz4.block.decompress(s, uncompressed_size=min(chunk, len(data) - i * chunk))
        best = min(best, time.perf_counter() - t0)
    out["lz4 decompress (for scale)"] = total_mb / best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mb", type=int, default=192)
    ap.add_argument("--chunk-kb", type=int, default=64)
    args = ap.parse_args()
    chunk = args.chunk_kb * 1024
    with tempfile.TemporaryDirectory(prefix="tidal-bench-zfile-") as tmp:
        data = make_rootfs_image(args.size_mb, Path(tmp))
    mb = len(data) / (1 << 20)
    rows = []
    gz_t0 = time.perf_counter()
    gz_size = len(zlib.compress(data, 6))
    gz_time = time.perf_counter() - gz_t0
    for codec in ("lz4", "zstd"):
        pc, pd, psize = plain_codec(data, chunk, codec)
        zc, zd, zsize, iops = zfile_codec(data, chunk, codec)
        rows.append(
            {
                "codec": codec,
                "zfile_compress_mb_s": mb / zc,
                "plain_compress_mb_s": mb / pc,
                "zfile_decompress_mb_s": mb / zd,
                "plain_decompress_mb_s": mb / pd,
                "compress_overhead_ratio": zc / pc,
                "decompress_overhead_ratio": zd / pd,
                "zfile_ratio": zsize / len(data),
                "plain_ratio": psize / len(data),
                "zfile_random_4k_reads_per_s": iops,
            }
        )
    print(f"input: ext4 root filesystem image, {mb:.0f} MiB, chunk {args.chunk_kb} KiB")
    print(
        f"{'codec':6} {'ZFile comp MB/s':>16} {'plain comp MB/s':>16} {'ZFile decomp MB/s':>18} "
        f"{'plain decomp MB/s':>18} {'ZFile size':>11} {'plain size':>11} {'rand 4K/s':>10}"
    )
    for r in rows:
        print(
            f"{r['codec']:6} {r['zfile_compress_mb_s']:16.0f} {r['plain_compress_mb_s']:16.0f} "
            f"{r['zfile_decompress_mb_s']:18.0f} {r['plain_decompress_mb_s']:18.0f} "
            f"{r['zfile_ratio']:10.1%} {r['plain_ratio']:10.1%} {r['zfile_random_4k_reads_per_s']:10.0f}"
        )
    print(
        f"whole-stream gzip -6 (no random access) for reference: {gz_size / len(data):.1%} in {mb / gz_time:.0f} MB/s"
    )
    checks = chunk_checks(data, chunk)
    print("per-chunk check of stored lz4 chunks (MB/s of stored bytes, best of 3):")
    for name, rate in checks.items():
        print(f"  {name:28} {rate:8.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "zfile",
                "input_bytes": len(data),
                "chunk_size_bytes": chunk,
                "rows": rows,
                "gzip_whole_stream": {"ratio": gz_size / len(data), "mb_s": mb / gz_time},
                "chunk_check_mb_s": checks,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
