"""Ordinary OCI images made on the spot (gzip tar layers), for interop tests with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tidal.blobs.local_store import LocalBlobStore
from tidal.ids import Digest, sha256_digest

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
SKOPEO_TIMEOUT_S = 60


@dataclass(frozen=True)
class OciImage:
    manifest: bytes
    config: bytes
    layers: dict[Digest, bytes]
    files: dict[str, bytes]

    @property
    def manifest_digest(self) -> Digest:
        return sha256_digest(self.manifest)


def make_oci_image(files: dict[str, bytes]) -> OciImage:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_MEDIA_TYPE, "digest": sha256_digest(layer), "size": len(layer)}
            ],
        },
        sort_keys=True,
    ).encode()
    return OciImage(manifest, config, {sha256_digest(layer): layer}, dict(files))


def layer_files(layer: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        out = {}
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            if fh is not None:
                out[m.name] = fh.read()
        return out


def write_oci_layout(path: Path, image: OciImage, tag: str) -> None:
    """An OCI image layout directory (what ``skopeo copy ... oci:DIR:TAG`` reads)."""
    store = LocalBlobStore(path)
    for blob in (image.manifest, image.config, *image.layers.values()):
        store.put_bytes(blob)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))


def skopeo(*args: str) -> str:
    proc = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=SKOPEO_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout
