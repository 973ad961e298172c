"""A state machine: whatever happens to the cache and the source, reads return the right bytes."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tidal.blobs.cached_source import CachedRangeSource
from tidal.blobs.chunk_cache import HEADER_BYTES, ChunkCache
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import ByteRange
from tidal.errors import RegistryUnavailableError
from tidal.testing.memory_store import MemoryBlobStore

CHUNK = 512
CHUNKS = 24


class CachedSourceMachine(RuleBasedStateMachine):
    @initialize(capacity_chunks=st.integers(2, 30))
    def setup(self, capacity_chunks: int) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.data = os.urandom(CHUNK * CHUNKS)
        self.store = MemoryBlobStore()
        self.digest = self.store.put_bytes(self.data)
        self.cache = ChunkCache(self._tmp.name, capacity_chunks * (CHUNK + HEADER_BYTES))
        self.src = CachedRangeSource(
            self.store,
            self.digest,
            cache=self.cache,
            check=lambda off, b: b == self.data[off : off + len(b)],
            settings=BlobSettings(fetch_concurrency=3, max_request_bytes=4 * CHUNK),
        )
        self.failures_armed = 0

    def teardown(self) -> None:
        if hasattr(self, "src"):
            self.src.close()
            self._tmp.cleanup()

    def _read(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except RegistryUnavailableError:
            assert self.failures_armed > 0  # only injected failures may surface
        self.failures_armed = self.store.fail_reads

    @rule(i=st.integers(0, CHUNKS - 1))
    def read_chunk(self, i: int) -> None:
        def go() -> None:
            assert self.src.read_at(i * CHUNK, CHUNK) == self.data[i * CHUNK : (i + 1) * CHUNK]

        self._read(go)

    @rule(idx=st.lists(st.integers(0, CHUNKS - 1), max_size=10))
    def fetch_batch(self, idx: list[int]) -> None:
        def go() -> None:
            ranges = [ByteRange.of(i * CHUNK, CHUNK) for i in idx]
            got = self.src.fetch_ranges(ranges)
            assert got == {r: self.data[r.start : r.end] for r in ranges}

        self._read(go)

    @rule(idx=st.lists(st.integers(0, CHUNKS - 1), max_size=10))
    def prefetch(self, idx: list[int]) -> None:
        pf = self.src.prefetch([ByteRange.of(i * CHUNK, CHUNK) for i in idx], concurrency=3)
        assert pf.wait(10)
        self.failures_armed = self.store.fail_reads

    @rule(n=st.integers(1, 2))
    def arm_failures(self, n: int) -> None:
        self.store.fail_reads = n
        self.store.fail_with = RegistryUnavailableError
        self.failures_armed = n

    @rule(seed=st.integers(0, 1000), how=st.sampled_from(["flip", "swap"]))
    def damage_an_entry(self, seed: int, how: str) -> None:
        entries = sorted((Path(self._tmp.name) / "entries").rglob("*.*.*"))
        if not entries:
            return
        path = random.Random(seed).choice(entries)
        if how == "flip":  # bit rot: the cache's own crc catches it
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x40
            path.write_bytes(bytes(raw))
        else:  # a well-formed entry with another chunk's bytes: only the caller's check knows
            offset = int(path.name.split(".")[1])
            other = (offset + CHUNK) % len(self.data)
            self.cache.put(
                self.src._key(ByteRange.of(offset, CHUNK)), self.data[other : other + CHUNK]
            )

    @invariant()
    def cache_bounded(self) -> None:
        if hasattr(self, "cache"):
            assert self.cache.size_bytes <= self.cache.capacity_bytes


TestCachedSourceMachine = CachedSourceMachine.TestCase
TestCachedSourceMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
