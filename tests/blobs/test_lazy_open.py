"""Opening a lazy image: how many requests each layer costs before the first read (issue 16)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from tidal.blobs.cached_source import CachedRangeSource, prime_tail
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import LazyImage
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.settings import BlobSettings
from tidal.ids import Digest
from tidal.image.extents import ExtentMap
from tidal.image.manifest import Image, ImageWriter, attach_trace, blob_path
from tidal.image.trace import Trace, TraceRange
from tidal.image.writable import WritableLayer
from tidal.image.zfile import FOOTER_SIZE, zfile_tail_size
from tidal.testing.memory_store import MemoryBlobStore

SIZE = 8 << 20


def build(path: Path, work: Path) -> Image:
    """Two data layers (lz4, then zstd with 128 KiB chunks) of scattered writes."""
    rng = random.Random(3)
    writer = ImageWriter(path, SIZE)
    wl = WritableLayer.create(work / "w1", SIZE)
    for _ in range(30):
        wl.write(rng.randrange(0, SIZE - 65536) // 512 * 512, rng.randbytes(3000) * 20)
    writer.commit_layer(wl)
    wl.close()
    base = Image(path, writer.write_manifest())
    wl2 = base.writable(work / "w2")
    for _ in range(20):
        wl2.write(rng.randrange(0, SIZE - 4096) // 512 * 512, rng.randbytes(4096))
    writer.commit_layer(wl2, codec="zstd", chunk_size_bytes=128 << 10)
    wl2.close()
    writer.write_manifest()
    return Image.open(path)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return build(tmp_path / "image", tmp_path)


def remote_copy(image: Image) -> MemoryBlobStore:
    store = MemoryBlobStore()
    local = LocalBlobStore(image.path)
    for rec in image.manifest.layers:
        store.put_bytes(local.read(rec.digest, 0, rec.size_bytes), rec.digest)
    return store


def test_the_manifest_record_gives_the_exact_tail_size(image: Image) -> None:
    for rec, layer in zip(image.manifest.data_layers, image.layers(), strict=True):
        expected = rec.size_bytes - FOOTER_SIZE - layer.zfile.tail_offset
        got = zfile_tail_size(
            rec.raw_data_bytes, rec.chunk_size_bytes, ExtentMap.serialized_size(rec.extent_count)
        )
        assert got == expected


@pytest.mark.parametrize("one_request", [True, False])
def test_a_layer_opens_with_one_request_for_footer_and_tail(
    image: Image, tmp_path: Path, one_request: bool
) -> None:
    store = remote_copy(image)
    settings = BlobSettings(tail_in_one_request=one_request)
    cache = ChunkCache(tmp_path / "cache", 64 << 20)
    with LazyImage.open(image.path, store, cache, settings) as lazy:
        lazy.image.layers()
        per_layer = len(image.manifest.data_layers)
        assert store.reads == (per_layer if one_request else 2 * per_layer)
        if one_request:  # each read ends at the blob's end and covers the whole tail
            sizes = {r.digest: r.size_bytes for r in image.manifest.layers}
            for digest, rng in store.read_log:
                assert rng.end == sizes[digest]
        view, lazy_view = image.merged_view(), lazy.image.merged_view()
        for off in range(0, SIZE, SIZE // 16):
            assert lazy_view.read(off, 8192) == view.read(off, 8192)
    reads_before = store.reads
    with LazyImage.open(image.path, store, cache, settings) as again:  # a second mount
        again.image.layers()
    assert store.reads == reads_before  # footer and tail both came from the cache


def test_a_wrong_tail_size_costs_one_range_and_still_opens(image: Image, tmp_path: Path) -> None:
    store = remote_copy(image)
    rec = image.manifest.data_layers[0]
    src = CachedRangeSource(
        store, rec.digest, rec.size_bytes, cache=ChunkCache(tmp_path / "c", 64 << 20)
    )
    assert prime_tail(src, 100)  # far too small: caches a range the reader never asks for
    assert store.reads == 1
    with LazyImage.open(image.path, store, src.cache) as lazy:
        lazy.image.layers()  # the reader reads the true tail itself
        assert lazy.image.merged_view().read(0, 4096) == image.merged_view().read(0, 4096)
    assert not prime_tail(src, rec.size_bytes)  # implausible: larger than the blob


class MeetingStore(MemoryBlobStore):
    """Its first two reads must be in flight together: each waits for the other (a barrier),
    so a caller that sends them one after the other fails with BrokenBarrierError."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=5)
        self.met = 0

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        if self.met < 2:
            self.met += 1
            self.barrier.wait()
        return super().read(digest, start, end)


def test_the_trace_comes_while_the_layer_opens_not_after(image: Image, tmp_path: Path) -> None:
    """One layer and a trace: the layer's tail and the trace blob are fetched together, so
    the mount waits one round trip for its metadata (before: footer, tail, then trace)."""
    trace = Trace((TraceRange(0, 64), TraceRange(4096, 8)))
    one_layer = tmp_path / "one"
    writer = ImageWriter(one_layer, SIZE)
    rec = image.manifest.data_layers[0]
    blob_path(one_layer, rec.digest).write_bytes(blob_path(image.path, rec.digest).read_bytes())
    writer.add_record(rec)
    writer.write_manifest()
    attach_trace(one_layer, trace.serialize())
    store = MeetingStore()
    local = LocalBlobStore(one_layer)
    manifest = Image.open(one_layer).manifest
    for r in manifest.layers:
        store.put_bytes(local.read(r.digest, 0, r.size_bytes), r.digest)
    pulled = tmp_path / "pulled"  # what a pull leaves: the manifest, no blobs
    pulled.mkdir()
    (pulled / "manifest.json").write_text(manifest.to_json())
    with LazyImage.open(pulled, store, ChunkCache(tmp_path / "cache", 64 << 20)) as lazy:
        lazy.open_layers()  # BrokenBarrierError if the two fetches were sequential
        assert store.met == 2
        assert lazy.prefetches and all(p.wait(10) for p in lazy.prefetches)
        assert lazy.stats.prefetched_chunks > 0
