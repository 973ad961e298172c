"""Stored size and per-chunk read cost of a Tidal image's layers, by codec, level and chunk size.

Issue 16's first lever: Tidal's lz4 layers weighed 1.46x the gzip image where eStargz takes
1.07x. This re-encodes the raw data of an existing image's layers (the packed sectors the
layer stores, exactly what ``WritableLayer.commit`` feeds the ZFile writer) with each
configuration and reports, beside the ``tar | gzip -6`` of the same tree (the baseline, given
as ``--gzip-bytes`` or measured from ``--rootfs``):

- the stored size (chunks, extent index, chunk table, footer: the whole blob) and its ratio to
  the gzip layer;
- the cost of reading one chunk on the lazy path: ``ZFileReader.chunk`` on a sample of the
  layer's chunks spread evenly over it (sha256 check + decompression + the per-chunk Python
  work), in microseconds per chunk and MB/s of raw data;
- how much of the raw data is 4 KiB blocks of zeros (file tails, unused inode table blocks),
  and how big the chunk table is (40 B per chunk: part of every mount's first fetch).

Every configuration sees the same bytes in one pass. Pure CPU, no root needed.

    .venv/bin/python benchmarks/bench_codec.py --image DIR [--rootfs DIR | --gzip-bytes N]
        [--configs lz4:64,zstd:3:64,...] [--sample-chunks 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import Image, blob_path
from tidal.image.source import BytesSource, FileSource
from tidal.image.zfile import ZFileInfo, ZFileReader, ZFileWriter

RESULTS = Path(__file__).parent / "results" / "codec.json"
DEFAULT_CONFIGS = (
    "lz4:64,zstd:1:64,zstd:3:64,zstd:6:64,zstd:3:128,zstd:6:128,zstd:3:256,zstd:6:256,"
    "zstd:9:256,zstd:3:512,gzip:6:64"
)
READ_STEP = 4 << 20
BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)


class _Sink:
    """A write-only stream that only counts (the writer needs no seek for its sizes)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        raise OSError("not seekable")

    def seekable(self) -> bool:
        return False


@dataclass
class Config:
    codec: str
    level: int | None
    chunk_kib: int

    @classmethod
    def parse(cls, text: str) -> Config:
        parts = text.split(":")
        try:
            if len(parts) == 2:
                return cls(parts[0], None, int(parts[1]))
            if len(parts) == 3:
                return cls(parts[0], int(parts[1]), int(parts[2]))
        except ValueError:
            pass
        raise SystemExit(f"--configs: {text!r} is not CODEC[:LEVEL]:CHUNK_KIB (e.g. zstd:3:128)")

    @property
    def label(self) -> str:
        level = f" -{self.level}" if self.level is not None else ""
        return f"{self.codec}{level}, {self.chunk_kib} KiB"


def gzip_size(rootfs: Path) -> int:
    """``tar | gzip -6 | wc -c`` of the tree: the ordinary image's one layer."""
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs),
         "-cf", "-", "."],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    gz = subprocess.run(
        ["sh", "-c", "gzip -6 -n | wc -c"], stdin=tar.stdout, capture_output=True, check=True
    )
    tar.wait()
    return int(gz.stdout.split()[0])


def measure(
    image_dir: Path, configs: list[Config], sample_chunks: int, *, timing_only: bool = False
) -> dict[str, object]:
    """Sizes of every configuration (unless ``timing_only``) and their per-chunk costs."""
    image = Image.open(image_dir)
    writers: list[tuple[Config, _Sink, ZFileWriter]] = []
    layers_out: list[dict[str, object]] = []
    raw_total = zero_blocks = 0
    samples: dict[int, list[bytes]] = {c.chunk_kib: [] for c in configs}
    for rec in image.manifest.data_layers:
        with FileSource(blob_path(image_dir, rec.digest)) as src:
            layer = ReadOnlyLayer(src, decoded_cache_chunks=0)
            raw = layer.zfile.raw_size_bytes
            meta = layer.zfile.metadata
            cur = [(c, s := _Sink(), _writer(s, c, meta)) for c in configs]
            writers += cur
            # A sample of raw chunks per chunk size, spread evenly over the layer.
            picks = {
                kib: _picks(raw, kib << 10, max(1, sample_chunks // len(image.manifest.layers)))
                for kib in samples
            }
            if timing_only:  # no size pass: read just the sampled chunks
                for kib, offsets in picks.items():
                    for start in offsets:
                        samples[kib].append(layer.read_data(start, min(kib << 10, raw - start)))
                for _c, _s, w in cur:
                    w.write(b"")
            pos = raw if timing_only else 0
            while pos < raw:
                n = min(READ_STEP, raw - pos)
                data = layer.read_data(pos, n)
                for _c, _s, w in cur:
                    w.write(data)
                view = memoryview(data)
                for off in range(0, n, BLOCK):
                    if view[off : off + BLOCK] == ZERO_BLOCK:
                        zero_blocks += 1
                for kib, offsets in picks.items():
                    size = kib << 10
                    for start in offsets:
                        if pos <= start < pos + n:
                            samples[kib].append(layer.read_data(start, min(size, raw - start)))
                pos += n
            raw_total += raw
            infos = [(c, w.close()) for c, _s, w in cur]
            layers_out.append(
                {
                    "digest": rec.digest,
                    "stored_bytes_now": rec.size_bytes,
                    "codec_now": rec.codec,
                    "raw_bytes": raw,
                    "extents": rec.extent_count,
                    "index_bytes": len(meta),
                    "by_config": {c.label: _info(i) for c, i in infos},
                }
            )
    by_config: dict[str, dict[str, object]] = {}
    for c in configs:
        stored = sum(
            int(layer["by_config"][c.label]["stored_bytes"])  # type: ignore[index]
            for layer in layers_out
        )
        table = sum(
            int(layer["by_config"][c.label]["table_bytes"])  # type: ignore[index]
            for layer in layers_out
        )
        us, mbs, write_mbs = read_cost(c, samples[c.chunk_kib])
        by_config[c.label] = {
            "codec": c.codec,
            "level": c.level,
            "chunk_kib": c.chunk_kib,
            "stored_bytes": stored,
            "table_bytes": table,
            "read_us_per_chunk": us,
            "read_raw_mb_s": mbs,
            "write_raw_mb_s": write_mbs,
        }
    return {
        "image": str(image_dir),
        "raw_bytes": raw_total,
        "zero_4k_blocks_bytes": zero_blocks * BLOCK,
        "layers": layers_out,
        "configs": by_config,
    }


def _writer(sink: _Sink, c: Config, metadata: bytes) -> ZFileWriter:
    return ZFileWriter(
        sink,  # type: ignore[arg-type]
        chunk_size_bytes=c.chunk_kib << 10,
        codec=c.codec,
        level=c.level,
        metadata=metadata,
    )


def _info(info: ZFileInfo) -> dict[str, int]:
    return {"stored_bytes": info.stored_size_bytes, "table_bytes": info.chunk_count * 40}


def _picks(raw: int, chunk: int, count: int) -> list[int]:
    chunks = max(1, raw // chunk)
    step = max(1, chunks // count)
    return [i * chunk for i in range(0, chunks, step)][:count]


def read_cost(c: Config, raws: list[bytes], rounds: int = 3) -> tuple[float, float, float]:
    """Microseconds per chunk and raw MB/s of ``ZFileReader.chunk`` over the sampled chunks
    (best of ``rounds``): the sha256 check, the decompression and the reader's own work; and
    the raw MB/s of writing them (compression, hashing: what a build's commit pays)."""
    size = c.chunk_kib << 10
    data = b"".join(raw.ljust(size, b"\0") for raw in raws)
    write_best = float("inf")
    for _ in range(rounds):
        buf = io.BytesIO()
        t0 = time.perf_counter()
        w = ZFileWriter(buf, chunk_size_bytes=size, codec=c.codec, level=c.level)
        w.write(data)
        w.close()
        write_best = min(write_best, time.perf_counter() - t0)
    reader = ZFileReader(BytesSource(buf.getvalue(), "sample"), decoded_cache_chunks=0)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(reader.chunk_count):
            reader.chunk(i)
        best = min(best, time.perf_counter() - t0)
    n = reader.chunk_count
    return best / n * 1e6, n * size / best / 1e6, len(data) / write_best / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--image", type=Path, required=True, help="a local Tidal image directory")
    ap.add_argument("--rootfs", type=Path, help="the tree it was built from (gzip baseline)")
    ap.add_argument("--gzip-bytes", type=int, help="the gzip layer's size, if known")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="CODEC[:LEVEL]:CHUNK_KIB,...")
    ap.add_argument("--sample-chunks", type=int, default=2000, help="chunks timed per config")
    ap.add_argument("--timing-only", action="store_true", help="skip the sizes (a quick run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.image / "manifest.json").exists():
        print(f"--image {args.image}: no manifest.json (not a Tidal image)", file=sys.stderr)
        return 2
    configs = [Config.parse(t) for t in args.configs.split(",") if t]
    gz = args.gzip_bytes
    if gz is None and args.rootfs is not None:
        gz = gzip_size(args.rootfs)
    t0 = time.monotonic()
    res = measure(args.image, configs, args.sample_chunks, timing_only=args.timing_only)
    res["gzip_bytes"] = gz
    res["seconds"] = time.monotonic() - t0
    print(
        f"{args.image}: raw layer data {res['raw_bytes'] / 1e6:.0f} MB, of which "
        f"{res['zero_4k_blocks_bytes'] / 1e6:.0f} MB are 4 KiB blocks of zeros; "
        f"gzip -6 tar {gz / 1e6 if gz else float('nan'):.1f} MB"
    )
    print(
        f"{'config':<22} {'stored MB':>10} {'vs gzip':>8} {'table KB':>9} {'read us/chunk':>14} "
        f"{'read MB/s':>10} {'write MB/s':>11}"
    )
    configs_out = res["configs"]
    assert isinstance(configs_out, dict)
    for label, r in configs_out.items():
        ratio = f"{r['stored_bytes'] / gz:.3f}x" if gz else "-"
        print(
            f"{label:<22} {r['stored_bytes'] / 1e6:>10.1f} {ratio:>8} "
            f"{r['table_bytes'] / 1e3:>9.0f} {r['read_us_per_chunk']:>14.0f} "
            f"{r['read_raw_mb_s']:>10.0f} {r['write_raw_mb_s']:>11.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
