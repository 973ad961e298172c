"""The batching device view: one coalesced request for all the chunks a block read needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import LazyImage
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.registry_client import RegistryBlobStore, RegistryClient
from tidal.blobs.source import copy_blob
from tidal.errors import LayerError
from tidal.image.manifest import Image, ImageWriter
from tidal.image.writable import WritableLayer
from tidal.testing.fake_registry import FakeRegistry
from tidal.testing.memory_store import MemoryBlobStore

SIZE = 4 << 20
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("img")
    writer = ImageWriter(tmp / "image", SIZE)
    wl = WritableLayer.create(tmp / "w", SIZE)
    text = b"".join(b"line %08d of a text file\n" % i for i in range(120_000))
    wl.write(0, text[: 3 << 20])
    writer.commit_layer(wl, chunk_size_bytes=CHUNK)
    wl.close()
    writer.write_manifest()
    return tmp / "image"


def remote_copy(image: Path) -> MemoryBlobStore:
    remote = MemoryBlobStore("registry")
    for rec in Image.open(image).manifest.layers:
        copy_blob(LocalBlobStore(image), remote, rec.digest)
    return remote


def test_a_cold_multi_chunk_read_is_one_request(image: Path, tmp_path: Path) -> None:
    local = Image.open(image).merged_view()
    offset, length = 5 * CHUNK + 100, 8 * CHUNK  # needs 9 chunks
    remote = remote_copy(image)
    with LazyImage.open(image, remote, ChunkCache(tmp_path / "a", 64 << 20)) as lazy:
        dev = lazy.device()  # opens the layers: footer and tail of the blob, in one request
        tail_reads = remote.reads
        assert tail_reads == 1  # (two before issue 16: the footer, then the tail)
        assert dev.read(offset, length) == local.read(offset, length)
        assert remote.reads - tail_reads == 1
        assert dev.batched_reads == 1
        assert dev.read(offset, length) == local.read(offset, length)  # now all hits
        assert remote.reads - tail_reads == 1
        with pytest.raises(LayerError, match="read-only"):
            dev.write(0, b"x")
    plain_remote = remote_copy(image)
    with LazyImage.open(image, plain_remote, ChunkCache(tmp_path / "b", 64 << 20)) as lazy:
        lazy.image.layers()
        tail_reads = plain_remote.reads
        assert lazy.image.merged_view().read(offset, length) == local.read(offset, length)
        assert plain_remote.reads - tail_reads == 9  # the plain view: a request per chunk


def test_plan_read_maps_device_bytes_to_stored_chunks(image: Path, tmp_path: Path) -> None:
    with LazyImage.open(image, remote_copy(image), ChunkCache(tmp_path, 64 << 20)) as lazy:
        ((digest, ranges),) = lazy.plan_read(CHUNK - 1, 2).items()
        assert len(ranges) == 2  # the read straddles a chunk boundary
        assert ranges[0].end == ranges[1].start  # stored back to back
        assert lazy.plan_read(SIZE - 4096, 4096) == {}  # a hole: nothing to fetch
        assert lazy.plan_read(0, 0) == {}
        assert digest == lazy.image.manifest.layers[0].digest


def test_without_a_cache_the_view_does_not_batch(image: Path) -> None:
    local = Image.open(image).merged_view()
    remote = remote_copy(image)
    with LazyImage.open(image, remote, None) as lazy:
        dev = lazy.device()
        before = remote.reads
        assert dev.read(3 * CHUNK, 3 * CHUNK) == local.read(3 * CHUNK, 3 * CHUNK)
        assert dev.batched_reads == 0
        assert remote.reads - before == 3  # fetched once each, not twice


def test_an_image_sharing_a_layer_reads_it_from_the_cache(image: Path, tmp_path: Path) -> None:
    """Image B = A's layer + its own top layer: B's reads of A's data need no network."""
    base = Image.open(image)
    (rec,) = base.manifest.layers
    writer = ImageWriter(tmp_path / "b", SIZE)
    copy_blob(LocalBlobStore(image), LocalBlobStore(tmp_path / "b"), rec.digest)
    writer.add_record(rec)
    top = Image(tmp_path / "b", writer.write_manifest()).writable(tmp_path / "wb")
    top.write(SIZE - 8192, b"only in image b")
    writer.commit_layer(top, chunk_size_bytes=CHUNK)
    top.close()
    writer.write_manifest()
    remote = remote_copy(image)
    for r in Image.open(tmp_path / "b").manifest.layers:
        copy_blob(LocalBlobStore(tmp_path / "b"), remote, r.digest)
    cache = ChunkCache(tmp_path / "node-cache", 64 << 20)
    with LazyImage.open(image, remote, cache) as a:
        assert a.device().read(0, 64 * 1024) == base.merged_view().read(0, 64 * 1024)
    with LazyImage.open(tmp_path / "b", remote, cache) as b:
        dev = b.device()
        before = remote.reads
        assert dev.read(0, 64 * 1024) == base.merged_view().read(0, 64 * 1024)
        assert remote.reads == before  # the shared layer's chunks were cached by image A
        assert dev.read(SIZE - 8192, 15) == b"only in image b"
        assert remote.reads > before


def test_stats_are_written_for_another_process(image: Path, tmp_path: Path) -> None:
    remote = remote_copy(image)
    with LazyImage.open(image, remote, ChunkCache(tmp_path / "c", 64 << 20)) as lazy:
        lazy.device().read(0, 4 * CHUNK)
        lazy.write_stats(tmp_path / "stats.json")
    doc = json.loads((tmp_path / "stats.json").read_text())
    assert doc["total"]["bytes_fetched"] == lazy.stats.bytes_fetched > 0
    assert doc["cache"]["puts"] >= 4
    assert doc["prefetch"]["running"] == 0
    assert list(doc["layers"]) == [r.digest for r in lazy.image.manifest.layers]


def test_a_lazy_image_over_a_registry_sends_no_head_requests(image: Path, tmp_path: Path) -> None:
    fake = FakeRegistry()
    remote = remote_copy(image)
    for rec in Image.open(image).manifest.layers:
        fake.blobs[rec.digest] = remote.read(rec.digest, 0, rec.size_bytes)
    with RegistryClient("fake", scheme="http", transport=fake.transport, load_auth_file=False) as c:
        store = RegistryBlobStore(c, "app")
        with LazyImage.open(image, store, ChunkCache(tmp_path, 64 << 20)) as lazy:
            lazy.device().read(0, 3 * CHUNK)
    methods = {m for m, _, _ in fake.log}
    assert methods == {"GET"}
