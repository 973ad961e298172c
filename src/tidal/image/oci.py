"""A Tidal image as an OCI image manifest, and back.

The pushed artifact is a valid OCI image manifest, so any distribution registry stores it and
independent clients (skopeo) can inspect and copy it. Block layers carry Tidal's own media type
and annotations that let a puller open them lazily without downloading them: the blob's tail
checksum, raw size, extent count, codec and chunk size. The config blob is a standard OCI image
config (os, architecture, the source image's ``config`` section, ``rootfs.diff_ids`` = the block
layer digests) plus Tidal's image size and filesystem type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypedDict

from tidal.errors import FormatError
from tidal.ids import Digest, parse_digest, sha256_digest
from tidal.image.manifest import LAYER_KIND_DATA, LAYER_KIND_TRACE, ImageManifest, LayerRecord

OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
TIDAL_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.tidal.zfile.v1"
TIDAL_TRACE_MEDIA_TYPE = "application/vnd.oci.image.layer.tidal.trace.v1"
"""Under the OCI layer prefix (as nydus's ``application/vnd.oci.image.layer.nydus.blob.v1``):
containerd's unpacker treats only ``application/vnd.oci.image.layer.*`` (and Docker's) as
layers. Any other type it downloads as a plain child and never hands to a snapshotter, so a
remote snapshotter could not serve it lazily and the layer count would not match
``rootfs.diff_ids``."""
LEGACY_LAYER_MEDIA_TYPES = (
    "application/vnd.tidal.image.layer.v1.zfile",
    "application/vnd.tidal.image.trace.v1",
)
"""What images pushed before the change carry; still pulled."""
TIDAL_FORMAT_VERSION = "1"

A_FORMAT = "io.tidal.image.format"
A_SIZE = "io.tidal.image.size-bytes"
A_FS = "io.tidal.image.fs-type"
A_KIND = "io.tidal.layer.kind"
A_RAW = "io.tidal.layer.raw-data-bytes"
A_EXTENTS = "io.tidal.layer.extent-count"
A_CODEC = "io.tidal.layer.codec"
A_CHUNK = "io.tidal.layer.chunk-size-bytes"
A_TAIL = "io.tidal.layer.tail-crc32"
A_SOURCE = "io.tidal.layer.source-digest"
A_SOURCE_DIFF = "io.tidal.layer.source-diff-id"
A_SNAPSHOT_LAYER = "containerd.io/snapshot/tidal.layer-kind"
"""The layer's kind again, under containerd's inherited label prefix: containerd's unpacker
passes ``containerd.io/snapshot/*`` annotations of a layer to the snapshotter's Prepare, which
is how Tidal's containerd snapshotter knows a Tidal layer (``tidal.snapshotter.model``)."""
A_INDEX_SHA256 = "io.tidal.layer.index-sha256"
"""The layer's chunk-table digest: with the manifest pinned by its digest, every chunk's sha256
is pinned too (see :mod:`tidal.image.zfile`)."""


class Descriptor(TypedDict, total=False):
    mediaType: str
    digest: str
    size: int
    annotations: dict[str, str]


@dataclass(frozen=True)
class OciArtifact:
    """The two JSON documents a push uploads (besides the layer blobs)."""

    manifest: bytes
    config: bytes

    @property
    def manifest_digest(self) -> Digest:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> Digest:
        return sha256_digest(self.config)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def to_oci(
    manifest: ImageManifest, *, architecture: str = "amd64", os_name: str = "linux"
) -> OciArtifact:
    """The OCI manifest and config that represent ``manifest``."""
    config_doc = {
        "architecture": architecture,
        "os": os_name,
        "config": manifest.config,
        "rootfs": {"type": "layers", "diff_ids": [r.digest for r in manifest.layers]},
        "tidal": {
            "format": manifest.format,
            "size_bytes": manifest.size_bytes,
            "fs_type": manifest.fs_type,
        },
    }
    config = _canonical(config_doc)
    layers: list[Descriptor] = []
    for r in manifest.layers:
        ann = {
            A_KIND: r.kind,
            A_SNAPSHOT_LAYER: r.kind,
            A_FORMAT: TIDAL_FORMAT_VERSION,
            A_RAW: str(r.raw_data_bytes),
            A_EXTENTS: str(r.extent_count),
            A_CODEC: r.codec,
            A_CHUNK: str(r.chunk_size_bytes),
            A_TAIL: str(r.tail_crc32),
        }
        if r.source_digest:
            ann[A_SOURCE] = r.source_digest
        if r.source_diff_id:
            ann[A_SOURCE_DIFF] = r.source_diff_id
        if r.index_sha256:
            ann[A_INDEX_SHA256] = r.index_sha256
        media = TIDAL_TRACE_MEDIA_TYPE if r.kind == LAYER_KIND_TRACE else TIDAL_LAYER_MEDIA_TYPE
        layers.append(
            {"mediaType": media, "digest": r.digest, "size": r.size_bytes, "annotations": ann}
        )
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": OCI_CONFIG_MEDIA_TYPE,
            "digest": sha256_digest(config),
            "size": len(config),
        },
        "layers": layers,
        "annotations": {
            A_FORMAT: TIDAL_FORMAT_VERSION,
            A_SIZE: str(manifest.size_bytes),
            A_FS: manifest.fs_type,
            **manifest.annotations,
        },
    }
    return OciArtifact(manifest=_canonical(doc), config=config)


def is_tidal_manifest(doc: dict[str, Any]) -> bool:
    tidal = (TIDAL_LAYER_MEDIA_TYPE, LEGACY_LAYER_MEDIA_TYPES[0])
    return any(layer.get("mediaType") in tidal for layer in doc.get("layers", []))


def from_oci(manifest_bytes: bytes, config_bytes: bytes, name: str = "manifest") -> ImageManifest:
    """Rebuild Tidal's manifest from a pulled OCI manifest and config (metadata only)."""
    try:
        doc = json.loads(manifest_bytes)
        cfg = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{name}: not valid JSON: {exc}") from exc
    except RecursionError:
        raise FormatError(f"{name}: JSON nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(cfg, dict):
        raise FormatError(f"{name}: the manifest and its config must be JSON objects")
    try:
        return _tidal_manifest(doc, cfg, name)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{name}: malformed Tidal manifest: {exc!r}") from exc


def _tidal_manifest(doc: dict[str, Any], cfg: dict[str, Any], name: str) -> ImageManifest:
    if not is_tidal_manifest(doc):
        raise FormatError(
            f"{name} is an ordinary OCI image, not a Tidal block image; convert it first with `tidal image convert`"
        )
    ann = doc.get("annotations", {})
    if ann.get(A_FORMAT) != TIDAL_FORMAT_VERSION:
        raise FormatError(f"{name}: Tidal format version {ann.get(A_FORMAT)!r} is not supported")
    records = []
    for layer in doc["layers"]:
        la = layer.get("annotations", {})
        kind = la.get(A_KIND, LAYER_KIND_DATA)
        records.append(
            LayerRecord(
                digest=parse_digest(layer["digest"]),
                size_bytes=int(layer["size"]),
                raw_data_bytes=int(la.get(A_RAW, 0)),
                extent_count=int(la.get(A_EXTENTS, 0)),
                codec=la.get(A_CODEC, "lz4"),
                chunk_size_bytes=int(la.get(A_CHUNK, 0)),
                tail_crc32=int(la.get(A_TAIL, 0)),
                kind=kind,
                source_digest=la.get(A_SOURCE),
                source_diff_id=la.get(A_SOURCE_DIFF),
                index_sha256=la.get(A_INDEX_SHA256),
            )
        )
    extra = {k: v for k, v in ann.items() if not k.startswith("io.tidal.image.")}
    return ImageManifest(
        size_bytes=int(ann[A_SIZE]),
        layers=tuple(records),
        fs_type=ann.get(A_FS, "ext4"),
        config=dict(cfg.get("config") or {}),
        annotations=extra,
    )
