"""Requests and bytes a trace replay costs, by coalescing gap and order (issue 16's levers).

A trace replay (``LazyImage.prefetch_trace``) turns the application's start-up trace into the
stored chunk ranges of each layer blob and groups neighbours into ranged requests with
``coalesce(..., gap_bytes=[blobs] coalesce_gap_bytes, max_bytes=[blobs] max_request_bytes,
keep_order=True)``. A gap lets two ranges that are close but not adjacent share a request: fewer
requests, plus the gap's bytes. This records the traces of bench_lazy_start's applications on
a local image (``record_app_trace``, imported from it), plans their replay and counts, for each
gap, the requests and the bytes they fetch, in trace order (the replay before issue 16: only
a chunk that follows the previous one in the trace joins its request), by need (every run of
neighbours merged, requests ordered by their earliest-needed chunk: ``[blobs] prefetch_order =
"need"``, the default now) and in plain offset order (the same requests, needed bytes later). Pure arithmetic on the plan: no network, so the
figures are exact, not timed.

    .venv/bin/python benchmarks/bench_coalesce.py --image DIR [--apps python,pandas]
        [--gaps 0,16384,65536,262144] [--max-request-bytes 4194304]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _lazy as bls  # what bench_lazy_start is built from (benchmarks/_lazy.py)
from tidal.blobs.cached_source import coalesce, coalesce_by_need
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import LazyImage
from tidal.blobs.local_store import LocalBlobStore
from tidal.image.trace import Trace

RESULTS = Path(__file__).parent / "results" / "coalesce.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--image", type=Path, required=True, help="a local Tidal image")
    ap.add_argument("--apps", default="python,pandas")
    ap.add_argument("--gaps", default="0,16384,65536,262144")
    ap.add_argument("--max-request-bytes", type=int, default=4 << 20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_coalesce records traces: it needs root (FUSE, loop, mount)", file=sys.stderr)
        return 1
    gaps = [int(g) for g in args.gaps.split(",") if g]
    results: dict[str, Any] = {"image": str(args.image), "apps": {}}
    with tempfile.TemporaryDirectory(prefix="tidal-coalesce-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        for name in args.apps.split(","):
            app = bls.APPS[name]
            variant = bls.image_variant(args.image, work / "rec" / name)
            bls.record_app_trace(variant, app, 600.0)
            with LazyImage.open(
                variant, LocalBlobStore(variant), ChunkCache(work / f"cache-{name}", 1 << 30)
            ) as lazy:
                trace = lazy.trace()
                assert isinstance(trace, Trace)
                plan = lazy.plan_prefetch(trace)
            chunk_bytes = sum(r.length for ranges in plan.values() for r in ranges)
            rows = {}
            for order in ("trace", "need", "offset"):
                for gap in gaps:
                    groups = [
                        g
                        for ranges in plan.values()
                        for g in (
                            coalesce_by_need(
                                ranges, gap_bytes=gap, max_bytes=args.max_request_bytes
                            )
                            if order == "need"
                            else coalesce(
                                ranges,
                                gap_bytes=gap,
                                max_bytes=args.max_request_bytes,
                                keep_order=order == "trace",
                            )
                        )
                    ]
                    fetched = sum(g.length for g in groups)
                    rows[f"{order} order, gap {gap}"] = {"requests": len(groups), "bytes": fetched}
                    print(
                        f"{name:<7} {order:>6} order, gap {gap // 1024:>4} KiB: {len(groups):>5} "
                        f"requests, {fetched / 1e6:>6.2f} MB "
                        f"({fetched / chunk_bytes - 1:+.1%} over the chunks)"
                    )
            results["apps"][name] = {
                "trace_ranges": len(trace.ranges),
                "trace_bytes": trace.total_bytes,
                "chunks": sum(len(r) for r in plan.values()),
                "chunk_bytes": chunk_bytes,
                "by_order_and_gap": rows,
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
