"""Lazy block reads of a Tidal image from a real registry vs downloading the layer first.

A Tidal image with one block layer (lz4 ZFile, 64 KiB chunks) holding real files from /usr
(libraries, Python modules) is pushed to the CNCF registry and read back the way a starting
container's filesystem reads its block device: 128 KiB reads (the loop device's readahead) in
short sequential runs scattered over the image, ~5 % of the data in all. With root, the
registry runs in a network namespace behind a veth pair shaped to 100 Mbit/s and 1 Gbit/s
(tc tbf); without root, on loopback.

Rows, per link (time until every read of the pattern has returned):
  baseline         download the whole layer blob (digest-checked), then read locally
  lazy per-chunk   merged view over CachedRangeSource: one request per missing chunk
  lazy batched     BatchingView: all chunks of a read in one coalesced request
  lazy+prefetch    the pattern replayed from a trace (16 requests in flight) while the
                   batched reads run, as on a cold start with a trace layer
  warm             a second open over the filled chunk cache: no network

    .venv/bin/python benchmarks/bench_blobs.py [--size-mib 128] [--rates 100,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import LazyImage, pull_image, push_image
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryBlobStore, RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import BlobRangeSource
from tidal.image.device import BlockDevice
from tidal.image.manifest import Image, ImageWriter
from tidal.image.trace import Trace, TraceRange
from tidal.image.writable import WritableLayer
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer
from tidal.units import SECTOR_BYTES

RESULTS = Path(__file__).parent / "results" / "blobs.json"
READ = 128 * 1024
REPO = "bench/app"


def real_bytes(size: int) -> bytes:
    """The first ``size`` bytes of files under /usr, in a fixed order (real, mixed data)."""
    out = bytearray()
    for root in ("/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as fh:
                        out += fh.read(size - len(out))
                except OSError:
                    continue
                if len(out) >= size:
                    return bytes(out)
    return bytes(out) + bytes(size - len(out))


def build_image(path: Path, work: Path, size: int) -> Image:
    writer = ImageWriter(path, size + (16 << 20))
    wl = WritableLayer.create(work / "w", size + (16 << 20))
    data = real_bytes(size)
    for off in range(0, size, 4 << 20):
        wl.write(off, data[off : off + (4 << 20)])
    writer.commit_layer(wl)
    wl.close()
    writer.write_manifest()
    return Image.open(path)


def access_pattern(size: int, fraction: float, runs: int, seed: int = 3) -> list[tuple[int, int]]:
    """(offset, length) device reads: ``runs`` sequential runs of 128 KiB reads, shuffled."""
    rng = random.Random(seed)
    per_run = max(1, int(size * fraction / READ / runs))
    starts = rng.sample(range(0, size // READ - per_run), runs)
    return [((s + i) * READ, READ) for s in starts for i in range(per_run)]


def run_reads(dev: BlockDevice, pattern: list[tuple[int, int]]) -> None:
    for off, n in pattern:
        dev.read(off, n)


def measure_link(
    client: RegistryClient, ref: ImageReference, pattern: list[tuple[int, int]], tmp: Path
) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    store = RegistryBlobStore(client, REPO)
    pulled = tmp / "pulled"
    manifest = pull_image(ref, pulled, client)

    t0 = time.monotonic()
    local = LocalBlobStore(tmp / "download")
    received = 0
    for rec in manifest.layers:
        local.put_bytes(client.get_blob(REPO, rec.digest), rec.digest)
        received += rec.size_bytes
    image = Image.open(pulled, source_factory=lambda d, n: BlobRangeSource(local, d, n))
    run_reads(image.merged_view(), pattern)
    rows["baseline"] = {"time_s": time.monotonic() - t0, "bytes_fetched": received}

    settings = BlobSettings(prefetch_concurrency=16)
    cache = ChunkCache(tmp / "cache", 4 << 30)
    trace = Trace(tuple(TraceRange(off // SECTOR_BYTES, n // SECTOR_BYTES) for off, n in pattern))
    for name in ("lazy per-chunk", "lazy batched", "lazy+prefetch", "warm"):
        if name != "warm":
            cache.clear()
        t0 = time.monotonic()
        with LazyImage.open(pulled, store, cache, settings) as lazy:
            dev: BlockDevice = (
                lazy.image.merged_view() if name == "lazy per-chunk" else lazy.device()
            )
            if name == "lazy+prefetch":
                lazy.prefetch_trace(trace)
            run_reads(dev, pattern)
            elapsed = time.monotonic() - t0
            for pf in lazy.prefetches:
                pf.wait()
            stats = lazy.stats
        rows[name] = {
            "time_s": elapsed,
            "bytes_fetched": stats.bytes_fetched,
            "requests": stats.requests,
        }
    cache.clear()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s (root only)")
    args = ap.parse_args()

    size = args.size_mib << 20
    pattern = access_pattern(size, args.fraction, runs=20)
    links: list[tuple[str, float | None]] = (
        [(f"{r} Mbit/s", float(r)) for r in args.rates.split(",")]
        if os.geteuid() == 0
        else [("loopback", None)]
    )
    results: dict[str, object] = {"pattern_reads": len(pattern), "links": {}}
    with tempfile.TemporaryDirectory(prefix="tidal-bench-blobs-") as tmpdir:
        tmp = Path(tmpdir)
        image = build_image(tmp / "image", tmp, size)
        blob_bytes = sum(r.size_bytes for r in image.manifest.layers)
        results["image_blob_bytes"] = blob_bytes
        print(
            f"image: {size >> 20} MiB of /usr files in one layer blob of "
            f"{blob_bytes / 2**20:.1f} MiB; start-up pattern: {len(pattern)} reads of 128 KiB "
            f"({len(pattern) * READ / size:.1%} of the data)"
        )
        for label, rate in links:
            link = ThrottledLink(rate).open() if rate else None
            try:
                server = (
                    RegistryServer(host=link.ns_address, wrap=link.exec_prefix)
                    if link
                    else RegistryServer()
                )
                with server:
                    cfg = BlobSettings(insecure_registries=(server.address,))
                    with RegistryClient(server.address, settings=cfg, load_auth_file=False) as c:
                        ref = ImageReference.parse(f"{server.address}/{REPO}:v1")
                        push_image(tmp / "image", ref, c)
                        run_dir = tmp / label.replace(" ", "").replace("/", "")
                        run_dir.mkdir()
                        rows = measure_link(c, ref, pattern, run_dir)
            finally:
                if link:
                    link.close()
            base = rows["baseline"]["time_s"]
            for row in rows.values():
                row["speedup_vs_baseline"] = base / row["time_s"] if row["time_s"] else 0.0
                row["fraction_fetched"] = row["bytes_fetched"] / blob_bytes
            results["links"][label] = rows  # type: ignore[index]
            print(f"\n{label}")
            print(
                f"  {'':15} {'time s':>8} {'MiB fetched':>12} {'% of blob':>10} "
                f"{'requests':>9} {'speed-up':>9}"
            )
            for name, row in rows.items():
                print(
                    f"  {name:15} {row['time_s']:8.2f} {row['bytes_fetched'] / 2**20:12.1f} "
                    f"{row['fraction_fetched']:10.1%} {row.get('requests', 1):9.0f} "
                    f"{row['speedup_vs_baseline']:8.1f}x"
                )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
