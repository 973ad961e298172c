import json

import pytest

from tidal.errors import FormatError
from tidal.ids import sha256_digest
from tidal.image.manifest import LAYER_KIND_TRACE, ImageManifest, LayerRecord
from tidal.image.oci import (
    OCI_MANIFEST_MEDIA_TYPE,
    TIDAL_LAYER_MEDIA_TYPE,
    TIDAL_TRACE_MEDIA_TYPE,
    from_oci,
    to_oci,
)


def _manifest() -> ImageManifest:
    rec = LayerRecord(
        sha256_digest(b"a"), 1234, 4096, 3, "lz4", 65536, 99, source_digest="sha256:" + "1" * 64
    )
    trace = LayerRecord(sha256_digest(b"t"), 40, 0, 0, "none", 0, 0, kind=LAYER_KIND_TRACE)
    return ImageManifest(
        size_bytes=1 << 30,
        layers=(rec, trace),
        config={"Cmd": ["/bin/sh"]},
        annotations={"org.example": "x"},
    )


def test_round_trip_through_oci_documents() -> None:
    m = _manifest()
    art = to_oci(m)
    doc = json.loads(art.manifest)
    assert doc["mediaType"] == OCI_MANIFEST_MEDIA_TYPE and doc["schemaVersion"] == 2
    assert [layer["mediaType"] for layer in doc["layers"]] == [
        TIDAL_LAYER_MEDIA_TYPE,
        TIDAL_TRACE_MEDIA_TYPE,
    ]
    assert doc["config"]["digest"] == art.config_digest
    assert json.loads(art.config)["rootfs"]["diff_ids"] == [r.digest for r in m.layers]
    assert from_oci(art.manifest, art.config) == m


def test_ordinary_oci_image_is_refused_with_a_hint() -> None:
    doc = {
        "schemaVersion": 2,
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}],
    }
    with pytest.raises(FormatError, match="tidal image convert"):
        from_oci(json.dumps(doc).encode(), b"{}", "reg/app:1")
