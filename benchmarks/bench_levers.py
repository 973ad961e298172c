"""Issue 16's image-side and mount-side levers, each measured on bench_lazy_start's lazy cases.

The same Debian/python tree, registry, shaped link, traces and cold-cache cases as
``bench_lazy_start.py`` (imported from it, not copied), but only Tidal's lazy cases, once per
*variant*: an image encoding (codec, level, chunk size — the image bench_lazy_start builds,
re-encoded from its layers' raw data, so every variant holds the same sectors and the same
trace) and a set of setting overrides (``TIDAL_BLOBS__...``, ``TIDAL_BLOCKDEV__...``), which
reach both this process and the FUSE server. Variants run interleaved, ``--repeat`` times;
the table shows the median run. Its images live in their own cache
(/var/cache/tidal-bench/levers/), so this bench never replaces bench_lazy_start's (or another
worktree's) cached images.

    .venv/bin/python benchmarks/bench_levers.py --variants NAME=ENCODING[+KEY=VALUE...],...
        [--rates 100,1000] [--apps python] [--repeat 3] [--cases cold,trace]

``ENCODING`` is ``lz4:64`` (the image as bench_lazy_start builds it) or
``CODEC[:LEVEL]:CHUNK_KIB`` (``zstd:3:64``); ``KEY=VALUE`` is a setting, e.g.
``blobs.prefetch_concurrency=4`` or ``blockdev.loop_read_ahead_kb=512``. Example:

    --variants 'base=lz4:64,zstd=zstd:3:64,zstd128=zstd:3:128,pf4=zstd:3:64+blobs.prefetch_concurrency=4'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _lazy as bls  # what bench_lazy_start is built from (benchmarks/_lazy.py)
from tidal.blobs.distribution import push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.cli.console import out as console
from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import (
    LAYER_KIND_TRACE,
    Image,
    ImageWriter,
    attach_trace,
    blob_path,
)
from tidal.image.source import FileSource
from tidal.image.zfile import ZFileWriter
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer

LEVERS_CACHE = bls.CACHE / "levers"
RESULTS = Path(__file__).parent / "results" / "levers.json"
READ_STEP = 4 << 20


@dataclass(frozen=True)
class Variant:
    name: str
    encoding: str
    settings: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variants: {text!r} is not NAME=ENCODING[+KEY=VALUE...]")
        encoding, *pairs = rest.split("+")
        settings = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            section, dot, field = key.partition(".")
            if not sep or not dot:
                raise SystemExit(f"--variants: setting {pair!r} is not SECTION.KEY=VALUE")
            settings[f"TIDAL_{section.upper()}__{field.upper()}"] = value
        return cls(name, encoding, settings)


def recode(src: Path, dest: Path, encoding: str) -> Path:
    """``src`` with its data layers re-encoded as ``encoding`` (``CODEC[:LEVEL]:CHUNK_KIB``):
    the same raw sectors and extent index, so the same filesystem and the same traces apply."""
    parts = encoding.split(":")
    codec, level = parts[0], (int(parts[1]) if len(parts) == 3 else None)
    chunk = int(parts[-1]) << 10
    if dest.joinpath("manifest.json").exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    image = Image.open(src)
    writer = ImageWriter(partial, image.manifest.size_bytes)
    for rec in image.manifest.layers:
        if rec.kind == LAYER_KIND_TRACE:
            continue
        with FileSource(blob_path(src, rec.digest)) as fs:
            layer = ReadOnlyLayer(fs, decoded_cache_chunks=0)
            tmp = partial / "blobs" / ".recode"
            with tmp.open("wb") as out:
                w = ZFileWriter(
                    out,
                    chunk_size_bytes=chunk,
                    codec=codec,
                    level=level,
                    metadata=layer.zfile.metadata,
                )
                raw = layer.zfile.raw_size_bytes
                for pos in range(0, raw, READ_STEP):
                    w.write(layer.read_data(pos, min(READ_STEP, raw - pos)))
                info = w.close()
        digest, size = writer.add_blob_file(tmp)
        writer.add_record(
            replace(
                rec,
                digest=digest,
                size_bytes=size,
                codec=info.codec.name.lower(),
                chunk_size_bytes=chunk,
                tail_crc32=info.tail_crc32,
                index_sha256=info.index_sha256,
            )
        )
    writer.write_manifest(config=image.manifest.config, annotations=image.manifest.annotations)
    partial.rename(dest)
    return dest


def trace_blob(image_dir: Path) -> bytes:
    for rec in Image.open(image_dir).manifest.layers:
        if rec.kind == LAYER_KIND_TRACE:
            return blob_path(image_dir, rec.digest).read_bytes()
    raise bls.BenchError(f"{image_dir} has no trace layer")


@contextlib.contextmanager
def overrides(env: dict[str, str]) -> Any:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def summarise(rows: list[bls.Row]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r.time_s)
    med = rows[(len(rows) - 1) // 2]
    return {
        "time_s": med.time_s,
        "time_s_all": [r.time_s for r in rows],
        "pull_s": med.fetch_s,
        "mount_s": med.prepare_s,
        "run_s": med.run_s,
        "wire_bytes_before_ready": med.wire_bytes_ready,
        "payload_bytes_before_ready": med.payload_bytes,
        "wire_bytes_total": med.wire_bytes_total,
        "requests_total": int((med.extra.get("total_after_prefetch") or {}).get("requests", 0)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--variants", required=True, help="NAME=ENCODING[+SECTION.KEY=VALUE...],...")
    ap.add_argument("--rates", default="100,1000")
    ap.add_argument("--apps", default="python")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="cold,trace", help="of cold, trace")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_levers needs root (netns, tc, FUSE, loop devices)", file=sys.stderr)
        return 1
    variants = [Variant.parse(t) for t in args.variants.split(",") if t]
    apps = [bls.APPS[a] for a in args.apps.split(",") if a]
    cases = [c for c in args.cases.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    signal.signal(signal.SIGTERM, bls.sigterm_as_interrupt)
    if not (bls.ROOTFS / "usr" / "bin" / "python3").exists():
        print(f"{bls.ROOTFS} is not built yet: run bench_lazy_start.py once", file=sys.stderr)
        return 1
    bls.ARTIFACTS = LEVERS_CACHE / "lazy-start"  # our own cache of images, see the docstring
    results: dict[str, Any] = {
        "benchmark": "levers",
        "argv": sys.argv[1:],
        "variants": {v.name: {"encoding": v.encoding, "settings": v.settings} for v in variants},
        "links": {},
    }
    with bls.work_dir() as work:
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        art = bls.ensure_artifacts(bls.ROOTFS, False, console)
        base_fp = art.tidal.parent.name
        images: dict[str, Path] = {}
        for enc in sorted({v.encoding for v in variants}):
            if enc == "lz4:64":
                images[enc] = art.tidal
            else:
                t0 = time.monotonic()
                images[enc] = recode(art.tidal, LEVERS_CACHE / "recoded" / base_fp / enc, enc)
                console.print(f"image {enc}: ready in {time.monotonic() - t0:.0f} s")
        sizes = {
            enc: sum(r.size_bytes for r in Image.open(p).manifest.data_layers)
            for enc, p in images.items()
        }
        results["image"] = {"oci_gzip_layer_bytes": art.oci_bytes, "tidal_layer_bytes": sizes}
        for enc, size in sizes.items():
            console.print(
                f"{enc}: {size / 1e6:.1f} MB = {size / art.oci_bytes:.3f}x the gzip layer"
            )
        # Traces: recorded once on the lz4 image, attached to every encoding (device offsets).
        traces: dict[str, bytes] = {}
        with (
            RegistryServer(storage_dir=work / "registry") as server,
            RegistryClient(server.address, load_auth_file=False) as client,
        ):
            for app in apps:
                rec_dir = bls.image_variant(art.tidal, work / "rec" / app.name)
                n, nbytes = bls.record_app_trace(rec_dir, app, args.timeout_s)
                traces[app.name] = trace_blob(rec_dir)
                console.print(f"trace of {app.name}: {n} ranges, {nbytes / 1e6:.1f} MB")
            for enc, path in images.items():
                tag = enc.replace(":", "-")
                push_image(
                    path,
                    ImageReference.parse(f"{server.address}/{bls.TIDAL_REPO}:{tag}"),
                    client,
                )
                for app in apps:
                    v = bls.image_variant(path, work / "variants" / tag / app.name)
                    attach_trace(v, traces[app.name])
                    ref = ImageReference.parse(
                        f"{server.address}/{bls.TIDAL_REPO}:{tag}-{app.name}"
                    )
                    push_image(v, ref, client)
        for rate in rates:
            label = f"{rate:g} Mbit/s"
            per: dict[str, dict[str, list[bls.Row]]] = {}
            with contextlib.ExitStack() as stack:
                link = stack.enter_context(ThrottledLink(rate))
                server = stack.enter_context(
                    RegistryServer(
                        storage_dir=work / "registry", host=link.ns_address, wrap=link.exec_prefix
                    )
                )
                os.environ["TIDAL_BLOBS__INSECURE_REGISTRIES"] = server.address
                env = bls.Env(work, server.address, bls.host_interface(link), art, args.timeout_s)
                for rep in range(args.repeat):
                    for app in apps:
                        for v in variants:
                            tag = v.encoding.replace(":", "-")
                            for case in cases:
                                image_tag = tag if case == "cold" else f"{tag}-{app.name}"
                                key = f"{app.name} {v.name} {case}"
                                cache = work / f"cache-{v.name}-{case}-{rep}"
                                console.print(f"{label}: {key}, run {rep + 1}/{args.repeat}")
                                try:
                                    with overrides(v.settings):
                                        row = bls.case_tidal(
                                            env, app, image_tag, cache, f"{v.name}-{case}-{rep}"
                                        )
                                    per.setdefault(key, {}).setdefault("rows", []).append(row)
                                except bls.BenchError as exc:
                                    console.print(f"[red]{label} {key}: {exc}")
                                finally:
                                    shutil.rmtree(cache, ignore_errors=True)
            summary = {k: summarise(d["rows"]) for k, d in per.items()}
            results["links"][label] = summary
            console.print(f"\n{label}")
            console.print(
                f"{'app variant case':<28} {'total s':>8} {'pull s':>7} {'mount s':>8} "
                f"{'run s':>6} {'MB ready':>9} {'requests':>9}  all runs"
            )
            for k, s in summary.items():
                console.print(
                    f"{k:<28} {s['time_s']:>8.2f} {s['pull_s']:>7.2f} {s['mount_s']:>8.2f} "
                    f"{s['run_s']:>6.2f} {s['wire_bytes_before_ready'] / 1e6:>9.2f} "
                    f"{s['requests_total']:>9}  " + " ".join(f"{t:.2f}" for t in s["time_s_all"])
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench created was removed", file=sys.stderr)
        sys.exit(130)
