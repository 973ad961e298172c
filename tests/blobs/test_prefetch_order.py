"""Trace replay: chunks grouped into requests by need (issue 16) or strictly in trace order."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tidal.blobs.cached_source import CachedRangeSource, coalesce, coalesce_by_need
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import ByteRange
from tidal.ids import Digest
from tidal.testing.memory_store import MemoryBlobStore

CHUNK = 1000


def chunk(i: int) -> ByteRange:
    return ByteRange(i * CHUNK, (i + 1) * CHUNK)


def test_neighbours_anywhere_in_the_trace_share_a_request_asked_for_by_first_need() -> None:
    trace = [chunk(i) for i in (7, 2, 8, 3, 20, 9, 4)]
    by_trace = coalesce(trace, keep_order=True)
    assert len(by_trace) == 7  # no chunk follows the one before it in the trace
    groups = coalesce_by_need(trace)
    assert [(g.start, g.end) for g in groups] == [(7000, 10000), (2000, 5000), (20000, 21000)]
    # chunk 7 is needed first, so its request goes first; chunk 20 (5th) after chunk 2's (2nd)


@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=40),
    st.integers(1, 8),
)
def test_grouping_by_need_carries_every_chunk_once_within_the_cap(
    order: list[int], cap_chunks: int
) -> None:
    trace = [chunk(i) for i in order]
    groups = coalesce_by_need(trace, max_bytes=cap_chunks * CHUNK)
    carried = [r for g in groups for r in g.ranges]
    assert sorted(carried) == sorted(set(trace))
    for g in groups:
        assert g.length <= cap_chunks * CHUNK
        assert g.start == g.ranges[0].start and g.end == g.ranges[-1].end
    firsts = [min(trace.index(r) for r in g.ranges) for g in groups]
    assert firsts == sorted(firsts)  # requests go out in order of first need
    assert len(groups) <= len(coalesce(trace, keep_order=True, max_bytes=cap_chunks * CHUNK))


def test_a_replay_by_need_sends_fewer_requests_for_the_same_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    store = MemoryBlobStore()
    digest = store.put_bytes(data)
    trace = [chunk(i) for i in (10, 1, 11, 2, 12, 3, 13, 4, 40, 41)]
    sent = {}
    for order in ("trace", "need"):
        before = store.reads
        src = CachedRangeSource(
            store,
            Digest(digest),
            len(data),
            cache=ChunkCache(tmp_path / order, 1 << 20),
            settings=BlobSettings(prefetch_order=order),  # type: ignore[arg-type]
        )
        with src:
            assert src.prefetch(trace, concurrency=1).wait(10)
            for r in trace:
                assert src.read_at(r.start, r.length) == data[r.start : r.end]
        sent[order] = store.reads - before
    assert sent == {"trace": 9, "need": 3}  # 40-41 follow each other in the trace too
