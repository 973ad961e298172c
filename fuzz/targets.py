"""Fuzz targets: every parser that reads bytes a stranger can write, and what it may raise.

Each target takes the fuzzer's bytes, feeds them to one parser the way Tidal's own code path
does (through a file where Tidal reads a file), and exercises what a reader would do next (read
every chunk, every layer, every rule). The contract is the same for all: a
:class:`~tidal.errors.TidalError` subclass (one line for the user) or success. Anything else
escaping -- ``KeyError``, ``UnicodeDecodeError``, ``RecursionError``, a hang, a crash -- is a
bug; :mod:`fuzz.run` reports it and the input goes to ``fuzz/regressions/<target>/``.

Seeds (:func:`seeds`) are valid inputs built by Tidal's own writers, so that coverage-guided
mutation starts inside the formats instead of at their first magic-number check. For the ZFile
reader the harness also repairs the crc32s the fuzzer breaks (:func:`_repair_zfile`): crc32 is
a transport check, not a defence, and without the repair almost every input stops at the
footer checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tidal.errors import TidalError

Target = Callable[[bytes], None]
_SCRATCH = Path(tempfile.mkdtemp(prefix="tidal-fuzz-"))


def _file(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


# --- image formats --------------------------------------------------------------------------


def _repair_zfile(data: bytes) -> bytes:
    """Recompute each chunk's crc32 and sha256, the tail crc32 and the footer crc32."""
    from tidal.image import zfile as zf

    if len(data) < zf.HEADER_SIZE + zf.FOOTER_SIZE:
        return data
    buf = bytearray(data)
    foot_at = len(buf) - zf.FOOTER_SIZE
    fields = list(zf._FOOTER.unpack_from(buf, foot_at))
    version, count, meta_size = fields[1], fields[6], fields[7]
    entry_size = zf.TABLE_ENTRY_SIZE if version >= zf.VERSION else zf.TABLE_ENTRY_SIZE_V1
    tail_size = meta_size + count * entry_size
    tail_at = foot_at - tail_size
    if count < 1 << 20 and tail_at >= zf.HEADER_SIZE:
        off = zf.HEADER_SIZE
        for i in range(count):
            entry = tail_at + meta_size + i * entry_size
            (size_word,) = struct.unpack_from("<I", buf, entry)
            stored = bytes(buf[off : off + (size_word & ~zf.RAW_FLAG)])
            struct.pack_into("<I", buf, entry + 4, zlib.crc32(stored))
            if entry_size == zf.TABLE_ENTRY_SIZE:
                buf[entry + 8 : entry + 40] = hashlib.sha256(stored).digest()
            off += size_word & ~zf.RAW_FLAG
        fields[8] = zlib.crc32(bytes(buf[tail_at:foot_at]))
        zf._FOOTER.pack_into(buf, foot_at, *fields)
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(bytes(buf[foot_at:-4])))
    return bytes(buf)


def zfile(data: bytes) -> None:
    from tidal.image.source import BytesSource
    from tidal.image.zfile import ZFileReader

    reader = ZFileReader(BytesSource(_repair_zfile(data), "fuzz.zfile"))
    reader.verify()
    if reader.raw_size_bytes:
        reader.read(0, min(reader.raw_size_bytes, 3 * reader.chunk_size_bytes))
        reader.read(reader.raw_size_bytes - 1, 1)


def extents(data: bytes) -> None:
    from tidal.image.extents import ExtentMap

    m = ExtentMap.deserialize(data, "fuzz.extents")
    m.serialize()


def trace(data: bytes) -> None:
    from tidal.image.trace import Trace

    t = Trace.deserialize(data, "fuzz.trace")
    t.serialize()


def tidal_manifest(data: bytes) -> None:
    """An image directory's manifest.json, opened as ``tidal image verify/mount`` do."""
    from tidal.image.manifest import Image

    d = _SCRATCH / "image"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_bytes(data)
    img = Image.open(d)
    _ = img.manifest.data_layers


def pulled_manifest(data: bytes) -> None:
    """A registry's OCI manifest + config for a Tidal image (``tidal image pull``)."""
    from tidal.image.oci import from_oci

    manifest, _, config = data.partition(b"\n--\n")
    from_oci(manifest, config or b"{}", "fuzz-manifest")


# --- source images (convert input) ---------------------------------------------------------


def _read_source(path: Path) -> None:
    from tidal.blockdev.oci_archive import open_source_image

    src = open_source_image(path)
    for layer in src.layers:
        with layer.open_tar() as tf:
            for member in tf:
                if member.isfile():
                    f = tf.extractfile(member)
                    if f is not None:
                        f.read()


def _layout_dir(name: str = "layout") -> Path:
    """A valid OCI layout (built once per name) whose documents a target replaces."""
    root = _SCRATCH / name
    if not (root / "index.json").exists():
        from tidal.testing.oci_builder import LayerTar, write_oci_layout

        a = LayerTar()
        a.add_raw("etc/hosts", data=b"127.0.0.1 localhost\n")
        write_oci_layout(root, [a.bytes()])
    return root


def oci_index(data: bytes) -> None:
    root = _layout_dir()
    (root / "index.json").write_bytes(data)
    _read_source(root)


def oci_manifest(data: bytes) -> None:
    """The manifest blob itself (stored under its own digest, so it reaches the parser)."""
    root = _layout_dir("layout-m")
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / "sha256" / digest
    kept = blob.exists()  # the layout's own manifest (the seed) stays
    blob.write_bytes(data)
    index = {"schemaVersion": 2, "manifests": [{"digest": f"sha256:{digest}", "size": len(data)}]}
    (root / "index.json").write_text(json.dumps(index))
    try:
        _read_source(root)
    finally:
        if not kept:
            blob.unlink(missing_ok=True)


def oci_archive(data: bytes) -> None:
    """Any bytes as an oci-archive / docker-archive tar file."""
    _read_source(_file("archive.tar", data))


# --- registry and credentials ---------------------------------------------------------------


def auth_json(data: bytes) -> None:
    from tidal.blobs.auth import load_credentials

    load_credentials("127.0.0.1:5000", _file("auth.json", data))


def reference(data: bytes) -> None:
    from tidal.blobs.reference import ImageReference

    ImageReference.parse(data.decode("utf-8", "surrogateescape"))


def www_authenticate(data: bytes) -> None:
    from tidal.blobs.auth import parse_token_response, parse_www_authenticate

    header, _, body = data.partition(b"\n\n")
    parse_www_authenticate(header.decode("latin-1"))
    parse_token_response(body, 0.0, "https://auth.example/token")


# --- QoS ------------------------------------------------------------------------------------


def qos_rules(data: bytes) -> None:
    from tidal.qos.rules import load_rules

    load_rules(_file("rules.yaml", data))


TARGETS: dict[str, Target] = {
    "zfile": zfile,
    "extents": extents,
    "trace": trace,
    "tidal-manifest": tidal_manifest,
    "pulled-manifest": pulled_manifest,
    "oci-index": oci_index,
    "oci-manifest": oci_manifest,
    "oci-archive": oci_archive,
    "auth-json": auth_json,
    "reference": reference,
    "www-authenticate": www_authenticate,
    "qos-rules": qos_rules,
}


def run_one(name: str, data: bytes) -> None:
    """The contract: success, or a TidalError (anything else propagates: a finding)."""
    with contextlib.suppress(TidalError):
        TARGETS[name](data)


# --- seeds ----------------------------------------------------------------------------------


def seeds(name: str) -> Iterator[bytes]:
    """Valid inputs for ``name``, made by Tidal's own writers."""
    if name == "zfile":
        from tidal.image.zfile import compress_bytes

        yield compress_bytes(b"tidal " * 5000, chunk_size_bytes=4096)
        yield compress_bytes(bytes(range(256)) * 64, chunk_size_bytes=4096, metadata=b"meta")
        yield compress_bytes(b"", chunk_size_bytes=4096)
    elif name == "extents":
        from tidal.image.extents import Extent, ExtentMap

        yield ExtentMap([Extent(0, 8, 0), Extent(64, 16, 8), Extent(100, 4, 0, True)]).serialize()
    elif name == "trace":
        from tidal.image.trace import Trace, TraceRange

        yield Trace((TraceRange(0, 8), TraceRange(100, 32))).serialize()
    elif name == "tidal-manifest":
        from tidal.ids import Digest
        from tidal.image.manifest import ImageManifest, LayerRecord

        rec = LayerRecord(Digest("sha256:" + "a" * 64), 4096, 512, 1, "lz4", 65536, 7)
        yield ImageManifest(size_bytes=1 << 20, layers=(rec,)).to_json().encode()
    elif name == "pulled-manifest":
        yield _pulled_seed()
    elif name in ("oci-index", "oci-manifest"):
        root = _layout_dir("layout-seed")
        index = json.loads((root / "index.json").read_text())
        if name == "oci-index":
            yield json.dumps(index).encode()
        else:
            digest = index["manifests"][0]["digest"].removeprefix("sha256:")
            yield (root / "blobs" / "sha256" / digest).read_bytes()
    elif name == "oci-archive":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(_layout_dir("layout-seed"), arcname=".")
        yield buf.getvalue()
    elif name == "auth-json":
        yield b'{"auths": {"127.0.0.1:5000": {"auth": "dXNlcjpwYXNz"}}}'
        yield b'{"auths": {"https://127.0.0.1:5000/v2/": {"username": "u", "password": "p"}}}'
    elif name == "reference":
        for text in ("127.0.0.1:5000/team/app:v1", "docker://localhost/a/b@sha256:" + "0" * 64):
            yield text.encode()
    elif name == "www-authenticate":
        yield (
            b'Bearer realm="https://auth.example/token",service="registry",'
            b'scope="repository:app:pull"\n\n{"token": "abc", "expires_in": 300}'
        )
    elif name == "qos-rules":
        from tidal.cli.qos import EXAMPLE_RULES

        yield EXAMPLE_RULES.encode()


def _pulled_seed() -> bytes:
    from tidal.ids import Digest
    from tidal.image.manifest import ImageManifest, LayerRecord
    from tidal.image.oci import to_oci

    rec = LayerRecord(Digest("sha256:" + "b" * 64), 4096, 512, 1, "lz4", 65536, 7)
    art = to_oci(ImageManifest(size_bytes=1 << 20, layers=(rec,)))
    return art.manifest + b"\n--\n" + art.config
