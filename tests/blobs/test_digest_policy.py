"""Images from before chunk digests: read with a warning, refused by [blobs] require_digests;
a forged chunk table is refused against the manifest's pin. No root, no registry: a local
blob store is the lazy source."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
import zlib
from pathlib import Path

import pytest

from tidal.blobs.distribution import LazyImage
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.settings import BlobSettings
from tidal.errors import ChecksumError, FormatError
from tidal.fsutil import write_text_atomic
from tidal.ids import Digest
from tidal.image.manifest import Image, ImageManifest, ImageWriter, blob_path
from tidal.image.source import BytesSource
from tidal.image.writable import WritableLayer
from tidal.image.zfile import FOOTER_SIZE, TABLE_ENTRY_SIZE, ZFileReader

SIZE = 4 << 20


def _image(path: Path, work: Path) -> Image:
    writer = ImageWriter(path, SIZE)
    wl = WritableLayer.create(work / "w", SIZE)
    wl.write(0, b"tidal " * 100_000)
    writer.commit_layer(wl)
    wl.close()
    writer.write_manifest()
    return Image.open(path)


def _v1_blob(blob: bytes) -> bytes:
    """The same layer blob in ZFile version 1 (crc32-only table)."""
    foot = len(blob) - FOOTER_SIZE
    count, meta = struct.unpack_from("<QQ", blob, foot + 24)
    table = foot - count * TABLE_ENTRY_SIZE
    entries = b"".join(blob[table + i * TABLE_ENTRY_SIZE :][:8] for i in range(count))
    tail = blob[table - meta : table] + entries
    footer = bytearray(blob[foot:])
    struct.pack_into("<H", footer, 8, 1)
    struct.pack_into("<I", footer, 40, zlib.crc32(tail))
    struct.pack_into("<I", footer, FOOTER_SIZE - 4, zlib.crc32(bytes(footer[:-4])))
    return blob[: table - meta] + tail + bytes(footer)


def _rewrite_layer(image: Image, new_blob: bytes, *, pin: str | None) -> Path:
    """The image with its one layer replaced by ``new_blob`` (manifest pin as given)."""
    digest = Digest("sha256:" + hashlib.sha256(new_blob).hexdigest())
    blob_path(image.path, digest).write_bytes(new_blob)
    new = dataclasses.replace(
        image.manifest.layers[0],
        digest=digest,
        size_bytes=len(new_blob),
        tail_crc32=ZFileReader(BytesSource(new_blob)).tail_crc32,
        index_sha256=pin,
    )
    manifest = ImageManifest(size_bytes=image.manifest.size_bytes, layers=(new,))
    write_text_atomic(image.path / "manifest.json", manifest.to_json())
    return image.path


def test_old_images_warn_or_are_refused_by_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = _image(tmp_path / "img", tmp_path)
    blob = blob_path(image.path, image.manifest.layers[0].digest).read_bytes()
    assert image.manifest.layers[0].index_sha256  # new images pin their chunk table
    path = _rewrite_layer(image, _v1_blob(blob), pin=None)
    store = LocalBlobStore(path)
    with (
        caplog.at_level(logging.WARNING),
        LazyImage.open(path, store, None, BlobSettings()) as lazy,
    ):
        assert lazy.image.merged_view().read(0, 6) == b"tidal "
    assert "carry no chunk digests" in caplog.text
    with pytest.raises(FormatError, match="refused by \\[blobs\\] require_digests"):
        LazyImage.open(path, store, None, BlobSettings(require_digests=True))


def test_a_table_that_does_not_match_the_manifests_pin_is_refused(tmp_path: Path) -> None:
    image = _image(tmp_path / "img", tmp_path)
    rec = image.manifest.layers[0]
    blob = bytearray(blob_path(image.path, rec.digest).read_bytes())
    # forge chunk 0 and its table entry consistently (crc32s fixed): only the pin can tell
    foot = len(blob) - FOOTER_SIZE
    count, meta = struct.unpack_from("<QQ", blob, foot + 24)
    table = foot - count * TABLE_ENTRY_SIZE
    size_word = struct.unpack_from("<I", blob, table)[0]
    stored_size = size_word & 0x7FFF_FFFF
    forged = bytes(blob[64 : 64 + stored_size]).replace(b"tidal", b"EVIL!", 1)
    blob[64 : 64 + stored_size] = forged
    struct.pack_into("<II32s", blob, table, size_word, zlib.crc32(forged),
                     hashlib.sha256(forged).digest())  # fmt: skip
    struct.pack_into("<I", blob, foot + 40, zlib.crc32(bytes(blob[table - meta : foot])))
    struct.pack_into("<I", blob, len(blob) - 4, zlib.crc32(bytes(blob[foot:-4])))
    path = _rewrite_layer(image, bytes(blob), pin=rec.index_sha256)
    pinned = pytest.raises(ChecksumError, match="does not match the digest its manifest pins")
    with pinned, LazyImage.open(path, LocalBlobStore(path), None, BlobSettings()) as lazy:
        lazy.image.merged_view().read(0, 6)


def test_verify_says_which_kind_of_check_each_image_got(tmp_path: Path) -> None:
    import subprocess
    import sys

    def verify(path: Path) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "image", "verify", str(path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return " ".join(done.stdout.split())

    image = _image(tmp_path / "new", tmp_path / "w1")
    assert "by sha256, chunk tables pinned by the manifest" in verify(image.path)
    old = _image(tmp_path / "old", tmp_path / "w2")
    blob = blob_path(old.path, old.manifest.layers[0].digest).read_bytes()
    path = _rewrite_layer(old, _v1_blob(blob), pin=None)
    assert "1 data layer(s) by crc32 only" in verify(path)


def test_a_forged_table_is_not_kept_in_the_chunk_cache(tmp_path: Path) -> None:
    """A man in the middle serves a consistent forgery (chunk, table entry, crc32s) under the
    layer's real digest: the mount is refused, and once the honest source is back the same
    node mounts the image (the forged table did not stay in its chunk cache)."""
    from tidal.blobs.chunk_cache import ChunkCache

    image = _image(tmp_path / "img", tmp_path / "w")
    rec = image.manifest.layers[0]
    blob = bytearray(blob_path(image.path, rec.digest).read_bytes())
    foot = len(blob) - FOOTER_SIZE
    count, meta = struct.unpack_from("<QQ", blob, foot + 24)
    table = foot - count * TABLE_ENTRY_SIZE
    size_word = struct.unpack_from("<I", blob, table)[0]
    forged = bytes(blob[64 : 64 + (size_word & 0x7FFF_FFFF)]).replace(b"tidal", b"EVIL!", 1)
    blob[64 : 64 + len(forged)] = forged
    struct.pack_into("<II32s", blob, table, size_word, zlib.crc32(forged),
                     hashlib.sha256(forged).digest())  # fmt: skip
    struct.pack_into("<I", blob, foot + 40, zlib.crc32(bytes(blob[table - meta : foot])))
    struct.pack_into("<I", blob, len(blob) - 4, zlib.crc32(bytes(blob[foot:-4])))
    evil = tmp_path / "evil"
    blob_path(evil, rec.digest).parent.mkdir(parents=True)
    blob_path(evil, rec.digest).write_bytes(bytes(blob))  # the forgery under the real name
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    pinned = pytest.raises(ChecksumError, match="does not match the digest its manifest pins")
    with pinned, LazyImage.open(image.path, LocalBlobStore(evil), cache, BlobSettings()) as lazy:
        lazy.image.merged_view().read(0, 6)
    with LazyImage.open(image.path, LocalBlobStore(image.path), cache, BlobSettings()) as lazy:
        assert lazy.image.merged_view().read(0, 6) == b"tidal "
