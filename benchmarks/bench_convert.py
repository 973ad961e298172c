"""Conversion time and size of a ~200 MB root filesystem: Tidal image vs ``tar | gzip``.

Input: a Debian bookworm minbase root filesystem made by ``debootstrap --variant=minbase``
into /var/cache/tidal-bench/ once and reused (network needed only the first time). Without
debootstrap the benchmark falls back to a copy of part of this machine's /usr.

Baseline: ``tar -cf - . | gzip -6`` of the same tree (what ``docker build``/``save`` stores).
Tidal: ``build_from_dir`` (cp -a into a fresh ext4 through the FUSE block device, then commit
to ZFile) with lz4 and zstd, and ``convert_oci`` of an OCI layout whose one layer is the
baseline's .tar.gz (the registry-to-Tidal conversion path). Run as root.

    .venv/bin/python benchmarks/bench_convert.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tidal.blockdev.builder import build_from_dir, convert_oci

CACHE = Path("/var/cache/tidal-bench")
ROOTFS = CACHE / "rootfs-bookworm-minbase"
RESULTS = Path(__file__).parent / "results" / "convert.json"


def ensure_rootfs() -> tuple[Path, str]:
    if (ROOTFS / "usr" / "bin").is_dir():
        return ROOTFS, "debootstrap bookworm minbase"
    if shutil.which("debootstrap"):
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / "rootfs.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "bookworm",
                str(tmp),
                "http://deb.debian.org/debian",
            ],
            capture_output=True,
        )
        if r.returncode == 0:
            tmp.rename(ROOTFS)
            return ROOTFS, "debootstrap bookworm minbase"
    fallback = CACHE / "rootfs-usr-slice"
    if not fallback.is_dir():
        fallback.mkdir(parents=True)
        subprocess.run(["cp", "-a", "/usr/bin", "/usr/lib/python3", str(fallback)], check=False)
    return fallback, "copy of /usr/bin + /usr/lib/python3"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def tar_gzip(tree: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with out.open("wb") as fh:
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(tree), "-cf", "-", "."],
            stdout=subprocess.PIPE,
        )
        gz = subprocess.run(["gzip", "-6"], stdin=tar.stdout, stdout=fh, check=True)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or gz.returncode != 0:
            raise RuntimeError("tar | gzip failed")
    return time.perf_counter() - t0


def oci_layout_from_tgz(tgz: Path, out: Path) -> None:
    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    h = hashlib.sha256()
    with tgz.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    layer_digest = "sha256:" + h.hexdigest()
    os.link(tgz, blobs / layer_digest[7:])
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    ).encode()
    (blobs / sha(cfg)[7:]).write_bytes(cfg)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(cfg),
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": tgz.stat().st_size,
                }
            ],
        }
    ).encode()
    (blobs / sha(manifest)[7:]).write_bytes(manifest)
    (out / "index.json").write_text(
        json.dumps(
            {"schemaVersion": 2, "manifests": [{"digest": sha(manifest), "size": len(manifest)}]}
        )
    )
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def main() -> int:
    if os.geteuid() != 0:
        print("bench_convert needs root (FUSE, loop devices, mount)", file=sys.stderr)
        return 1
    tree, what = ensure_rootfs()
    src_bytes = du_bytes(tree)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tidal-bench-convert-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        tgz = work / "rootfs.tar.gz"
        t = tar_gzip(tree, tgz)
        rows.append(
            {"method": "tar | gzip -6 (baseline)", "seconds": t, "stored_bytes": tgz.stat().st_size}
        )
        for codec in ("lz4", "zstd"):
            res = build_from_dir(tree, work / f"img-{codec}", codec=codec)
            rows.append(
                {
                    "method": f"tidal image build ({codec})",
                    "seconds": res.seconds,
                    "stored_bytes": res.stored_bytes,
                }
            )
        oci_layout_from_tgz(tgz, work / "oci")
        res = convert_oci(work / "oci", work / "img-converted")
        rows.append(
            {
                "method": "tidal image convert of the .tar.gz (lz4)",
                "seconds": res.seconds,
                "stored_bytes": res.stored_bytes,
            }
        )
    base = rows[0]
    for r in rows:
        r["time_ratio_vs_tar_gzip"] = r["seconds"] / base["seconds"]
        r["size_ratio_vs_tar_gzip"] = r["stored_bytes"] / base["stored_bytes"]
        r["size_ratio_vs_source"] = r["stored_bytes"] / src_bytes
    print(f"input: {what} at {tree}, {src_bytes / 1e6:.0f} MB in files")
    print(
        f"{'method':44} {'seconds':>8} {'stored MB':>10} {'x time':>7} {'x size':>7} {'of src':>7}"
    )
    for r in rows:
        print(
            f"{r['method']:44} {r['seconds']:8.1f} {r['stored_bytes'] / 1e6:10.1f} "
            f"{r['time_ratio_vs_tar_gzip']:7.2f} {r['size_ratio_vs_tar_gzip']:7.2f} {r['size_ratio_vs_source']:7.1%}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"benchmark": "convert", "input": what, "source_bytes": src_bytes, "rows": rows},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
