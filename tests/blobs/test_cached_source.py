"""CachedRangeSource: cache hits, checksum hook, coalescing, concurrency, prefetch, chains."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.blobs.cached_source import (
    CachedRangeSource,
    ZFileChunkCheck,
    coalesce,
    lazy_source_factory,
)
from tidal.blobs.chain import FallbackBlobSource
from tidal.blobs.chunk_cache import ChunkCache, ChunkKey
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import ByteRange
from tidal.errors import (
    BlobIntegrityError,
    BlobNotFoundError,
    BlobUnavailableError,
    CacheError,
    FormatError,
    RegistryUnavailableError,
)
from tidal.ids import Digest
from tidal.image.source import RandomAccessSource
from tidal.image.zfile import ZFileReader, compress_bytes
from tidal.testing.memory_store import MemoryBlobStore

CHUNK = 4096
pytestmark = pytest.mark.usefixtures("no_leaked_threads")


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 64 << 20)


class SlowStore(MemoryBlobStore):
    """A remote store with latency that records how many reads overlap."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("slow")
        self.delay_s = delay_s
        self.active = 0
        self.max_active = 0
        self._gate = threading.Lock()

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        with self._gate:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay_s)
            return super().read(digest, start, end)
        finally:
            with self._gate:
                self.active -= 1


def blob(store: MemoryBlobStore, size: int = 64 * CHUNK) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return store.put_bytes(data), data


def chunks(*indexes: int) -> list[ByteRange]:
    return [ByteRange.of(i * CHUNK, CHUNK) for i in indexes]


def test_miss_then_hit_and_a_second_source_reads_no_network(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    src = CachedRangeSource(store, digest, cache=cache)
    assert isinstance(src, RandomAccessSource)
    assert src.read_at(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert src.read_at(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    s = src.stats
    assert (s.misses, s.hits, s.requests, s.bytes_fetched) == (1, 1, 1, CHUNK)
    again = CachedRangeSource(store, digest, len(data), cache=cache)  # "second mount"
    assert again.read_at(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert again.stats.requests == 0
    assert store.reads == 1


def test_out_of_range_read_is_a_format_error(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, _data = blob(store, 100)
    src = CachedRangeSource(store, digest, cache=cache)
    with pytest.raises(FormatError, match="offset 90"):
        src.read_at(90, 20)
    assert src.read_at(100, 0) == b""


def test_cached_entry_failing_the_check_is_dropped_and_refetched(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    key = ChunkKey(digest, 0, CHUNK)
    cache.put(key, b"\0" * CHUNK)  # well-formed entry, wrong content (e.g. a bad peer)
    src = CachedRangeSource(
        store, digest, cache=cache, check=lambda off, b: b == data[off : off + len(b)]
    )
    assert src.read_at(0, CHUNK) == data[:CHUNK]
    assert src.stats.check_failures == 1
    assert cache.get(key) == data[:CHUNK]


def test_corrupt_source_is_refused_and_nothing_cached(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    store.corrupt.add(digest)
    src = CachedRangeSource(
        store, digest, cache=cache, check=lambda off, b: b == data[off : off + len(b)]
    )
    with pytest.raises(BlobIntegrityError, match="failed its checksum twice"):
        src.read_at(0, CHUNK)
    assert store.reads == 2
    assert cache.entry_count() == 0


def test_fetch_ranges_coalesces_adjacent_chunks(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    src = CachedRangeSource(store, digest, cache=cache)
    got = src.fetch_ranges(chunks(3, 4, 5, 9, 10, 20))
    assert {r: data[r.start : r.end] for r in chunks(3, 4, 5, 9, 10, 20)} == got
    assert sorted(r for _, r in store.read_log) == [
        ByteRange(3 * CHUNK, 6 * CHUNK),
        ByteRange(9 * CHUNK, 11 * CHUNK),
        ByteRange(20 * CHUNK, 21 * CHUNK),
    ]
    src.fetch_ranges(chunks(4, 5, 6))  # 4 and 5 are cached: only 6 goes out
    assert store.read_log[-1][1] == ByteRange(6 * CHUNK, 7 * CHUNK)
    assert src.read_at(9 * CHUNK, CHUNK) == data[9 * CHUNK : 10 * CHUNK]  # split into chunks
    assert src.stats.requests == 4


def test_fetch_ranges_keeps_several_requests_in_flight(cache: ChunkCache) -> None:
    store = SlowStore(0.05)
    digest, _data = blob(store)
    cfg = BlobSettings(fetch_concurrency=4)
    src = CachedRangeSource(store, digest, cache=cache, settings=cfg)
    t0 = time.monotonic()
    got = src.fetch_ranges(chunks(*range(0, 64, 2)))  # 32 non-adjacent chunks
    elapsed = time.monotonic() - t0
    assert len(got) == 32
    assert store.max_active == 4
    assert elapsed < 32 * 0.05 * 0.75  # clearly parallel (serial would be 1.6 s)


def test_max_request_bytes_splits_long_runs(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, _ = blob(store)
    cfg = BlobSettings(max_request_bytes=4 * CHUNK)
    src = CachedRangeSource(store, digest, cache=cache, settings=cfg)
    src.fetch_ranges(chunks(*range(10)))
    assert sorted(r.length for _, r in store.read_log) == [2 * CHUNK, 4 * CHUNK, 4 * CHUNK]


def test_prefetch_fills_the_cache_in_the_background(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    src = CachedRangeSource(store, digest, cache=cache)
    pf = src.prefetch(chunks(7, 1, 2, 3, 30), concurrency=3)
    assert pf.wait(10)
    assert pf.errors == []
    assert src.stats.prefetched_chunks == 5
    n = store.reads
    for r in chunks(7, 1, 2, 3, 30):
        assert src.read_at(r.start, r.length) == data[r.start : r.end]
    assert store.reads == n  # all hits
    assert src.prefetch(chunks(1, 2)).wait(10)
    assert store.reads == n  # cached chunks are skipped by prefetch too
    src.close()


def test_demand_reads_jump_the_prefetch_queue(cache: ChunkCache) -> None:
    store = SlowStore(0.1)
    digest, data = blob(store)
    with CachedRangeSource(store, digest, cache=cache) as src:
        pf = src.prefetch(chunks(*range(0, 60, 2)), concurrency=2)  # 30 requests: ~1.5 s
        t0 = time.monotonic()
        assert src.read_at(58 * CHUNK, CHUNK) == data[58 * CHUNK : 59 * CHUNK]  # last in queue
        latency = time.monotonic() - t0
        assert not pf.done
        assert latency < 0.6  # one request, not the queue ahead of it
        pf.cancel()
        assert pf.done


def test_demand_read_waits_for_the_request_already_in_flight(cache: ChunkCache) -> None:
    store = SlowStore(0.2)
    digest, data = blob(store)
    with CachedRangeSource(store, digest, cache=cache) as src:
        pf = src.prefetch(chunks(5))
        deadline = time.monotonic() + 5
        while store.active == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the prefetch request is in flight
        assert src.read_at(5 * CHUNK, CHUNK) == data[5 * CHUNK : 6 * CHUNK]
        assert pf.wait(5)
        assert store.reads == 1
        assert src.stats.inflight_waits == 1


def test_prefetch_failures_are_recorded_not_raised(cache: ChunkCache) -> None:
    store = MemoryBlobStore()
    digest, data = blob(store)
    store.fail_reads = 1
    store.fail_with = RegistryUnavailableError
    with CachedRangeSource(store, digest, cache=cache) as src:
        pf = src.prefetch(chunks(0), concurrency=1)
        assert pf.wait(5)
        assert len(pf.errors) == 1 and "injected" in pf.errors[0]
        assert src.read_at(0, CHUNK) == data[:CHUNK]  # the demand read fetches on its own


def test_prefetch_needs_a_cache() -> None:
    store = MemoryBlobStore()
    digest, _ = blob(store)
    with pytest.raises(CacheError, match="needs a chunk cache"):
        CachedRangeSource(store, digest, cache=None).prefetch(chunks(0))


def test_zfile_read_lazily_fetches_only_the_chunks_it_needs(cache: ChunkCache) -> None:
    raw = os.urandom(20 * CHUNK) + bytes(44 * CHUNK)  # incompressible + zero chunks
    zf = compress_bytes(raw, chunk_size_bytes=CHUNK, codec="lz4")
    store = MemoryBlobStore()
    digest = store.put_bytes(zf)
    src = lazy_source_factory(store, cache)(digest, len(zf))
    reader = ZFileReader(src, decoded_cache_chunks=0)
    assert reader.read(5 * CHUNK + 100, 2 * CHUNK) == raw[5 * CHUNK + 100 : 7 * CHUNK + 100]
    tail = len(zf) - reader.tail_offset
    fetched = src.stats.bytes_fetched
    assert fetched <= tail + 3 * (CHUNK + 64)  # the tail plus three chunks, not the blob
    assert fetched < len(zf) / 4
    # A wrong-but-well-formed cached chunk fails the ZFile crc check, is dropped and refetched.
    span = reader.span(6)
    cache.put(ChunkKey(digest, span.stored_offset, span.stored_size), b"\1" * span.stored_size)
    assert reader.read(6 * CHUNK, 10) == raw[6 * CHUNK : 6 * CHUNK + 10]
    assert src.stats.check_failures == 1


def test_zfile_chunk_check_knows_chunks_and_passes_other_ranges() -> None:
    raw = os.urandom(3 * CHUNK)
    zf = compress_bytes(raw, chunk_size_bytes=CHUNK)
    reader = ZFileReader(MemoryBlobSourceAdapter(zf))
    check = ZFileChunkCheck(reader)
    sp = reader.span(1)
    good = zf[sp.stored_offset : sp.stored_offset + sp.stored_size]
    assert check(sp.stored_offset, good)
    assert not check(sp.stored_offset, bytes([good[0] ^ 1]) + good[1:])
    assert check(len(zf) - 64, zf[-64:])  # the footer is not a chunk
    assert check(sp.stored_offset, good[:10])  # not a whole chunk: not this check's business


class MemoryBlobSourceAdapter:
    def __init__(self, data: bytes) -> None:
        self.data = data

    name = "mem"

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def test_chain_falls_back_from_peer_to_registry(cache: ChunkCache) -> None:
    peer = MemoryBlobStore("peer")
    registry = MemoryBlobStore("registry")
    digest, data = blob(registry)
    chain = FallbackBlobSource([peer, registry])
    assert chain.name == "peer -> registry" and chain.is_remote and chain.supports_ranges
    assert chain.has(digest) and chain.size(digest) == len(data)
    src = CachedRangeSource(chain, digest, cache=cache)
    assert src.read_at(0, CHUNK) == data[:CHUNK]
    peer.put_bytes(data)
    peer.fail_reads, peer.fail_with = 1, RegistryUnavailableError  # a peer that went away
    assert src.read_at(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert src.read_at(2 * CHUNK, CHUNK) == data[2 * CHUNK : 3 * CHUNK]
    assert chain.served_by == {"peer": 1, "registry": 2}
    assert src.read_at(0, CHUNK) == data[:CHUNK]  # the cache answers first
    assert chain.served_by == {"peer": 1, "registry": 2}


def test_chain_errors_say_whether_missing_or_unavailable() -> None:
    a, b = MemoryBlobStore("a"), MemoryBlobStore("b")
    digest, _ = blob(a)
    missing = Digest("sha256:" + "7" * 64)
    with pytest.raises(BlobNotFoundError, match="no source could serve"):
        FallbackBlobSource([b, MemoryBlobStore("c")]).read(missing, 0, 1)
    a.fail_reads, a.fail_with = 1, RegistryUnavailableError
    with pytest.raises(BlobUnavailableError, match="retry"):
        FallbackBlobSource([a, b]).read(digest, 0, 1)


@settings(max_examples=80, deadline=None)
@given(
    starts=st.lists(st.integers(0, 60), max_size=25),
    gap=st.integers(0, 3),
    max_chunks=st.integers(1, 8),
    keep_order=st.booleans(),
)
def test_coalesce_covers_every_range_within_bounds(
    starts: list[int], gap: int, max_chunks: int, keep_order: bool
) -> None:
    ranges = [ByteRange.of(s * 100, 100) for s in starts]
    groups = coalesce(
        ranges, gap_bytes=gap * 100, max_bytes=max_chunks * 100, keep_order=keep_order
    )
    members = [r for g in groups for r in g.ranges]
    assert sorted(members) == sorted(set(ranges))
    for g in groups:
        assert g.length <= max_chunks * 100
        assert all(g.start <= r.start and r.end <= g.end for r in g.ranges)
        covered = sum(r.length for r in set(g.ranges))
        assert g.length - covered <= gap * 100 * (len(g.ranges) - 1)
    if not keep_order:
        assert [g.start for g in groups] == sorted(g.start for g in groups)


def test_a_failed_read_logs_blob_range_and_cause(
    cache: ChunkCache, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryBlobStore("registry r:5000/app")
    digest, data = blob(store)
    store.fail_reads, store.fail_with = 1, RegistryUnavailableError
    src = CachedRangeSource(store, digest, cache=cache)
    with (
        caplog.at_level("ERROR", logger="tidal.blobs.cache"),
        pytest.raises(RegistryUnavailableError),
    ):
        src.read_at(CHUNK, CHUNK)
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"[{CHUNK}, {2 * CHUNK})" in line
    assert digest[:19] in line and "injected failure" in line
    assert src.read_at(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]  # the next read recovers


def test_a_peer_serving_corrupt_chunks_is_skipped_for_the_registry(cache: ChunkCache) -> None:
    peer, registry = MemoryBlobStore("peer"), MemoryBlobStore("registry")
    digest, data = blob(registry)
    peer.put_bytes(data)
    peer.corrupt.add(digest)
    chain = FallbackBlobSource([peer, registry])
    src = CachedRangeSource(
        chain, digest, cache=cache, check=lambda off, b: b == data[off : off + len(b)]
    )
    assert src.read_at(2 * CHUNK, CHUNK) == data[2 * CHUNK : 3 * CHUNK]
    assert src.stats.check_failures == 1
    assert chain.served_by["registry"] == 1
    assert cache.get(ChunkKey(digest, 2 * CHUNK, CHUNK)) == data[2 * CHUNK : 3 * CHUNK]
    registry.corrupt.add(digest)
    with pytest.raises(BlobIntegrityError, match="no source served good bytes"):
        src.read_at(5 * CHUNK, CHUNK)
