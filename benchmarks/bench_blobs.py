"""Lazy blob reads from a real registry vs downloading the whole blob first.

A ZFile layer blob (lz4, 64 KiB chunks) is made from real files under /usr (libraries,
Python modules), pushed to the CNCF registry, and read back the way a starting container reads
its image: a start-up access pattern touching ~5 % of the data in 40 runs of neighbouring chunks,
read in order, one demand read at a time. With root, the registry runs in a network namespace
behind a veth pair shaped to 100 Mbit/s and 1 Gbit/s (tc tbf); without root, on loopback.

Rows, per link:
  baseline      download the whole blob (digest-checked), then read the pattern locally
  lazy cold     CachedRangeSource over the registry, empty chunk cache
  lazy+prefetch the pattern's chunks replayed in the background (as from a trace, 16 in
                flight) while the same demand reads run
  warm          a new source over the filled cache (a second mount): no network

    .venv/bin/python benchmarks/bench_blobs.py [--size-mib 128] [--rates 100,1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tidal.blobs.cached_source import CachedRangeSource, ZFileChunkCheck
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.registry_client import RegistryBlobStore, RegistryClient
from tidal.blobs.registry_server import RegistryServer
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import ByteRange
from tidal.blobs.throttle import ThrottledLink
from tidal.ids import Digest
from tidal.image.source import BytesSource
from tidal.image.zfile import ZFileReader, ZFileWriter

RESULTS = Path(__file__).parent / "results" / "blobs.json"
CHUNK = 64 * 1024
REPO = "bench/layer"


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


def make_zfile(raw: bytes) -> bytes:
    buf = io.BytesIO()
    w = ZFileWriter(buf, chunk_size_bytes=CHUNK, codec="lz4")
    w.write(raw)
    w.close()
    return buf.getvalue()


def access_pattern(raw_size: int, fraction: float, runs: int, seed: int = 3) -> list[ByteRange]:
    """Raw ranges a start-up reads: ``runs`` runs of neighbouring chunks, ``fraction`` in total."""
    rng = random.Random(seed)
    chunks = raw_size // CHUNK
    per_run = max(1, int(chunks * fraction / runs))
    starts = sorted(rng.sample(range(chunks - per_run), runs))
    out = []
    for s in starts:
        for i in range(s, s + per_run):
            # a demand read inside the chunk (e.g. 16 KiB of a file), at a random place
            out.append(ByteRange.of(i * CHUNK + rng.randrange(0, CHUNK - 16384), 16384))
    rng.shuffle(out)  # the order a process touches its files is not the order on disk
    return out


def run_reads(reader: ZFileReader, pattern: list[ByteRange]) -> None:
    for r in pattern:
        reader.read(r.start, r.length)


def measure_link(
    client: RegistryClient, digest: Digest, blob: bytes, pattern: list[ByteRange], tmp: Path
) -> dict[str, dict[str, float]]:
    store = RegistryBlobStore(client, REPO)
    rows: dict[str, dict[str, float]] = {}

    t0 = time.monotonic()
    whole = client.get_blob(REPO, digest)
    local = ZFileReader(BytesSource(whole, "downloaded"), decoded_cache_chunks=0)
    run_reads(local, pattern)
    rows["baseline"] = {"time_s": time.monotonic() - t0, "bytes_fetched": len(whole)}

    settings = BlobSettings(prefetch_concurrency=16)
    cache = ChunkCache(tmp / "cache", 4 << 30)

    def lazy_reader() -> tuple[CachedRangeSource, ZFileReader]:
        src = CachedRangeSource(store, digest, len(blob), cache=cache, settings=settings)
        reader = ZFileReader(src, decoded_cache_chunks=0)
        src.set_check(ZFileChunkCheck(reader))
        return src, reader

    t0 = time.monotonic()
    src, reader = lazy_reader()
    run_reads(reader, pattern)
    rows["lazy cold"] = {"time_s": time.monotonic() - t0, "bytes_fetched": src.stats.bytes_fetched}

    cache.clear()
    t0 = time.monotonic()
    src, reader = lazy_reader()
    spans = [s for r in pattern for s in reader.chunk_spans(r.start, r.length)]
    trace = list(dict.fromkeys(ByteRange.of(s.stored_offset, s.stored_size) for s in spans))
    pf = src.prefetch(trace)
    run_reads(reader, pattern)
    elapsed = time.monotonic() - t0
    pf.wait()
    src.close()
    rows["lazy+prefetch"] = {"time_s": elapsed, "bytes_fetched": src.stats.bytes_fetched}

    t0 = time.monotonic()
    src, reader = lazy_reader()
    run_reads(reader, pattern)
    rows["warm"] = {"time_s": time.monotonic() - t0, "bytes_fetched": src.stats.bytes_fetched}
    cache.clear()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s (root only)")
    args = ap.parse_args()

    raw = real_bytes(args.size_mib << 20)
    blob = make_zfile(raw)
    pattern = access_pattern(len(raw), args.fraction, runs=40)
    print(
        f"blob: {len(blob) / 2**20:.1f} MiB stored ({len(raw) / 2**20:.0f} MiB raw), "
        f"start-up pattern: {len(pattern)} reads of 16 KiB in {len(pattern)} chunks "
        f"({len(pattern) * CHUNK / len(raw):.1%} of the chunks)"
    )
    links: list[tuple[str, float | None]] = (
        [(f"{r} Mbit/s", float(r)) for r in args.rates.split(",")]
        if os.geteuid() == 0
        else [("loopback", None)]
    )
    results: dict[str, object] = {
        "blob_stored_bytes": len(blob),
        "raw_bytes": len(raw),
        "pattern_reads": len(pattern),
        "links": {},
    }
    with tempfile.TemporaryDirectory(prefix="tidal-bench-blobs-") as tmpdir:
        tmp = Path(tmpdir)
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
                        digest = c.push_blob_stream(REPO, io.BytesIO(blob))
                        rows = measure_link(c, digest, blob, pattern, tmp)
            finally:
                if link:
                    link.close()
            base = rows["baseline"]["time_s"]
            for row in rows.values():
                row["speedup_vs_baseline"] = base / row["time_s"] if row["time_s"] else 0.0
                row["fraction_fetched"] = row["bytes_fetched"] / len(blob)
            results["links"][label] = rows  # type: ignore[index]
            print(f"\n{label}")
            print(f"  {'':14} {'time s':>8} {'MiB fetched':>12} {'% of blob':>10} {'speed-up':>9}")
            for name, row in rows.items():
                print(
                    f"  {name:14} {row['time_s']:8.2f} {row['bytes_fetched'] / 2**20:12.1f} "
                    f"{row['fraction_fetched']:10.1%} {row['speedup_vs_baseline']:8.1f}x"
                )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
