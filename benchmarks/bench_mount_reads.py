"""What the kernel reads from an image's block device to mount it, and then to run a command.

Issue 16's mount-time lever: on a cold lazy mount every distinct ZFile chunk the kernel reads
is a request, and the reads that ``mount`` makes happen one after another (each waits for the
previous: superblock, then group descriptors, then the root inode...), so their count is the
number of round trips the mount itself costs. This mounts a local image with the FUSE server
recording every device range it serves (``trace_out``), unmounts, and maps the ranges to the
layers' stored chunks, for each variant of the mount's settings (loop read-ahead, ext4 mount
options). With ``--command`` it runs that command chrooted in the mount before unmounting
(e.g. ``python3 -c 'import json'``), to see how read-ahead changes the chunks a start needs.

    .venv/bin/python benchmarks/bench_mount_reads.py --image DIR
        [--variants "default=;ra0=read_ahead_kb:0;ra512=read_ahead_kb:512;opts=options:noload,noatime"]
        [--command "python3 -c 'import json'"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tidal.blockdev import mounts
from tidal.blockdev.settings import BlockdevSettings
from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import Image
from tidal.image.merged import resolve
from tidal.image.trace import Trace
from tidal.units import SECTOR_BYTES

RESULTS = Path(__file__).parent / "results" / "mount_reads.json"
DEFAULT_VARIANTS = "default=;ra0=read_ahead_kb:0;ra32=read_ahead_kb:32;ra512=read_ahead_kb:512"


def chunks_of(image: Image, trace: Trace) -> tuple[int, int, int]:
    """(distinct chunks, their stored bytes, runs of consecutive new chunks) the ranges read."""
    layers = image.layers()
    seen: set[tuple[int, int]] = set()
    stored = runs = 0
    for tr in trace.ranges:
        new = False
        for seg, layer in resolve(layers, tr.lba_sectors, tr.length_sectors):
            ext = seg.extent
            if layer is None or ext is None or ext.zeroed:
                continue
            zf = layer.zfile if isinstance(layer, ReadOnlyLayer) else None
            if zf is None:
                continue
            for sp in zf.chunk_spans(
                ext.data_offset_sectors * SECTOR_BYTES, ext.length_sectors * SECTOR_BYTES
            ):
                key = (id(layer), sp.index)
                if key not in seen:
                    seen.add(key)
                    stored += sp.stored_size
                    new = True
        runs += new
    return len(seen), stored, runs


def run_variant(
    image_dir: Path, work: Path, name: str, spec: str, command: list[str] | None
) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    options = None
    if spec:
        key, _, value = spec.partition(":")
        if key == "read_ahead_kb":
            kw["loop_read_ahead_kb"] = int(value)
        elif key == "options":
            options = value
        else:
            raise SystemExit(f"--variants: {spec!r}: expected read_ahead_kb:N or options:OPTS")
    settings = BlockdevSettings(**kw)
    target = work / f"mnt-{name}"
    trace_path = work / f"trace-{name}"
    t0 = time.monotonic()
    mounts.mount_image(
        image_dir, target, settings=settings, trace_out=trace_path, ext4_options=options
    )
    mount_s = time.monotonic() - t0
    run_s = 0.0
    try:
        if command:
            t1 = time.monotonic()
            subprocess.run(
                ["unshare", "--mount", "--pid", "--fork", "chroot", str(target), *command],
                check=True,
                capture_output=True,
                env={
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8",
                },
            )
            run_s = time.monotonic() - t1
    finally:
        mounts.unmount(target)
    trace = Trace.deserialize(trace_path.read_bytes())
    image = Image.open(image_dir)
    chunks, stored, runs = chunks_of(image, trace)
    return {
        "spec": spec,
        "mount_s": mount_s,
        "run_s": run_s,
        "ranges": len(trace.ranges),
        "device_bytes": trace.total_bytes,
        "chunks": chunks,
        "stored_bytes": stored,
        "sequential_fetches": runs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--command", help="run this chrooted in the mount before unmounting")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_mount_reads needs root (FUSE, loop devices, mount)", file=sys.stderr)
        return 1
    command = shlex.split(args.command) if args.command else None
    results: dict[str, Any] = {"image": str(args.image), "command": args.command, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="tidal-mount-reads-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TIDAL_DATA_ROOT", str(work / "data"))
        for item in args.variants.split(";"):
            name, _, spec = item.partition("=")
            res = run_variant(args.image, work, name, spec, command)
            results["variants"][name] = res
            print(
                f"{name:<10} mount {res['mount_s']:.2f} s, run {res['run_s']:.2f} s: "
                f"{res['ranges']} device reads, {res['device_bytes'] / 1e3:.0f} KB; "
                f"{res['chunks']} chunks ({res['stored_bytes'] / 1e3:.0f} KB stored) in "
                f"{res['sequential_fetches']} reads that each needed a new chunk"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
