"""Chunk cache: LRU bound against a model, corruption and crash safety, concurrent processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tidal.blobs.chunk_cache import HEADER_BYTES, STALE_TMP_S, ChunkCache, ChunkKey
from tidal.blobs.settings import DEFAULT_CACHE_MEMORY_BYTES, BlobSettings
from tidal.errors import CacheError
from tidal.ids import Digest, sha256_digest

BLOB = sha256_digest(b"some layer")


def key(offset: int, length: int, digest: Digest = BLOB) -> ChunkKey:
    return ChunkKey(digest, offset, length)


def content(k: ChunkKey) -> bytes:
    """Deterministic bytes for a key, so any reader can tell a wrong entry from a right one."""
    seed = hashlib.sha256(f"{k.digest}{k.offset}".encode()).digest()
    return (seed * (k.length // 32 + 1))[: k.length]


def test_put_get_and_counters(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    k = key(4096, 100)
    assert cache.get(k) is None
    assert cache.put(k, content(k))
    assert cache.get(k) == content(k)
    assert cache.get(key(0, 100)) is None
    s = cache.stats
    assert (s.hits, s.misses, s.puts, s.bytes_hit, s.bytes_stored) == (1, 2, 1, 100, 100)
    assert cache.size_bytes == 100 + HEADER_BYTES
    assert cache.drop(k) and not cache.drop(k)
    assert cache.get(k) is None


def test_same_range_of_another_blob_is_another_entry(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    a, b = key(0, 10), key(0, 10, sha256_digest(b"other"))
    cache.put(a, b"a" * 10)
    cache.put(b, b"b" * 10)
    assert (cache.get(a), cache.get(b)) == (b"a" * 10, b"b" * 10)


def test_wrong_length_and_oversized_entries(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1000)
    with pytest.raises(CacheError, match="100 bytes by its key"):
        cache.put(key(0, 100), b"short")
    assert not cache.put(key(0, 2000), b"x" * 2000)
    assert cache.entry_count() == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_entry_is_dropped_not_served(tmp_path: Path, damage: str) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    k = key(0, 1000)
    cache.put(k, content(k))
    (path,) = (tmp_path / "entries").rglob("*.0.1000")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[500] ^= 1
    elif damage == "truncate":
        del raw[700:]  # a power loss after the rename persisted but before all data did
    else:
        raw.clear()
    path.write_bytes(bytes(raw))
    assert cache.get(k) is None
    assert cache.stats.corrupt_dropped == 1
    assert not path.exists()
    cache.put(k, content(k))
    assert cache.get(k) == content(k)


def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    entry = 100 + HEADER_BYTES
    cache = ChunkCache(tmp_path, 4 * entry, low_water_ratio=0.75)  # evict down to 3 entries
    keys = [key(i * 100, 100) for i in range(4)]
    for k in keys:
        cache.put(k, content(k))
    assert cache.get(keys[0]) is not None  # 0 becomes the most recent; 1 is now the oldest
    cache.put(key(400, 100), content(key(400, 100)))
    assert cache.entry_count() == 3
    assert cache.stats.evictions == 2
    assert cache.contains(keys[0]) and not cache.contains(keys[1]) and not cache.contains(keys[2])


def test_crash_before_publication_leaves_no_entry(tmp_path: Path) -> None:
    """A writer killed between writing and renaming leaves only a temp file, never an entry."""
    script = textwrap.dedent(
        f"""
        import os
        from tidal.blobs.chunk_cache import ChunkCache, ChunkKey
        cache = ChunkCache({str(tmp_path)!r}, 1 << 20)
        os.replace = lambda *a, **k: os._exit(9)   # the process dies right before the rename
        cache.put(ChunkKey({BLOB!r}, 0, 5), b"hello")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert proc.returncode == 9
    tmp_files = list((tmp_path / "tmp").iterdir())
    assert len(tmp_files) == 1
    cache = ChunkCache(tmp_path, 1 << 20)
    assert cache.get(key(0, 5)) is None
    assert list((tmp_path / "tmp").iterdir()) == tmp_files  # young: maybe a live writer's
    old = time.time() - STALE_TMP_S - 10
    os.utime(tmp_files[0], (old, old))
    ChunkCache(tmp_path, 1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_threads_never_see_wrong_bytes(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 40 * (512 + HEADER_BYTES))
    keys = [key(i * 512, 512) for i in range(100)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(150):
            k = keys[(seed * 7 + i * 13) % len(keys)]
            got = cache.get(k)
            if got is None:
                cache.put(k, content(k))
            elif got != content(k):
                errors.append(f"wrong bytes for {k}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.size_bytes <= cache.capacity_bytes


def test_processes_share_the_cache_and_its_bound(tmp_path: Path) -> None:
    capacity = 30 * (1024 + HEADER_BYTES)
    script = textwrap.dedent(
        f"""
        import hashlib, sys
        from tidal.blobs.chunk_cache import ChunkCache, ChunkKey
        cache = ChunkCache({str(tmp_path)!r}, {capacity})
        seed = int(sys.argv[1])
        bad = 0
        for i in range(200):
            k = ChunkKey({BLOB!r}, ((seed * 31 + i * 17) % 80) * 1024, 1024)
            want = (hashlib.sha256(f"{{k.digest}}{{k.offset}}".encode()).digest() * 33)[:1024]
            got = cache.get(k)
            if got is None:
                cache.put(k, want)
            elif got != want:
                bad += 1
        s = cache.stats
        print(bad, s.hits, s.evictions)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append([int(x) for x in out.split()])
    assert [bad for bad, _, _ in results] == [0, 0, 0, 0]
    assert sum(hits for _, hits, _ in results) > 0
    assert sum(ev for _, _, ev in results) > 0
    assert ChunkCache(tmp_path, capacity).size_bytes <= capacity


class CacheModel(RuleBasedStateMachine):
    """The cache behaves like an LRU dict evicting to the low-water mark when over capacity."""

    ENTRY_SIZES = (10, 50, 200)

    def __init__(self) -> None:
        super().__init__()
        self.model: OrderedDict[ChunkKey, int] = OrderedDict()

    @initialize()
    def setup(self) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        self.capacity = 1000
        self.cache = ChunkCache(self._tmp.name, self.capacity, low_water_ratio=0.6)

    def teardown(self) -> None:
        self._tmp.cleanup()

    def _total(self) -> int:
        return sum(size + HEADER_BYTES for size in self.model.values())

    @rule(slot=st.integers(0, 9), size=st.sampled_from(ENTRY_SIZES))
    def put(self, slot: int, size: int) -> None:
        k = key(slot * 1000, size)
        self.cache.put(k, content(k))
        self.model[k] = size
        self.model.move_to_end(k)
        if self._total() > self.capacity:
            while self._total() > self.cache.low_water_bytes:
                self.model.popitem(last=False)

    @rule(slot=st.integers(0, 9), size=st.sampled_from(ENTRY_SIZES))
    def get(self, slot: int, size: int) -> None:
        k = key(slot * 1000, size)
        got = self.cache.get(k)
        if k in self.model:
            assert got == content(k)
            self.model.move_to_end(k)
        else:
            assert got is None

    @rule(slot=st.integers(0, 9), size=st.sampled_from(ENTRY_SIZES))
    def drop(self, slot: int, size: int) -> None:
        k = key(slot * 1000, size)
        assert self.cache.drop(k) == (k in self.model)
        self.model.pop(k, None)

    @invariant()
    def bounded_and_equal(self) -> None:
        if hasattr(self, "cache"):
            assert self.cache.size_bytes == self._total() <= self.capacity


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# --- the memory tier ---------------------------------------------------------------------


def _entry_files(root: Path) -> list[Path]:
    return [p for p in (root / "entries").rglob("*") if p.is_file()]


def test_memory_tier_serves_a_put_without_the_file(tmp_path: Path) -> None:
    """What a prefetch just stored is served from memory: no file open, read or utime."""
    cache = ChunkCache(tmp_path / "c", 1 << 20, memory_bytes=1 << 16)
    k = key(0, 1000)
    assert cache.put(k, content(k))
    (entry,) = _entry_files(tmp_path / "c")  # still published for other processes
    entry.unlink()
    assert cache.contains(k)
    assert cache.get(k) == content(k)
    assert cache.stats.hits == 1
    assert ChunkCache(tmp_path / "c", 1 << 20).get(k) is None  # no tier: the directory only


def test_memory_tier_is_bounded_and_falls_back_to_the_directory(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", 1 << 20, memory_bytes=2500)
    keys = [key(i * 1000, 1000) for i in range(3)]
    for k in keys:
        cache.put(k, content(k))
    for f in _entry_files(tmp_path / "c"):
        f.unlink()
    # 2,500 bytes hold the last two entries; the first was pushed out and its file is gone
    assert [cache.get(k) is not None for k in keys] == [False, True, True]


def test_memory_tier_hit_refreshes_and_disk_hit_fills_it(tmp_path: Path) -> None:
    root = tmp_path / "c"
    ChunkCache(root, 1 << 20).put(key(0, 1000), content(key(0, 1000)))  # another process's
    cache = ChunkCache(root, 1 << 20, memory_bytes=2500)
    a, b, c = key(0, 1000), key(1000, 1000), key(2000, 1000)
    assert cache.get(a) == content(a)  # from the directory, now also in memory
    cache.put(b, content(b))
    assert cache.get(a) is not None  # a is now the most recently used of the two
    cache.put(c, content(c))  # pushes b out of memory, not a
    for f in _entry_files(root):
        f.unlink()
    assert (cache.get(a), cache.get(b), cache.get(c)) == (content(a), None, content(c))


def test_drops_reach_the_memory_tier(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", 1 << 20, memory_bytes=1 << 16)
    other = sha256_digest(b"other layer")
    a, b, c = key(0, 100), key(100, 100), key(0, 100, other)
    for k in (a, b, c):
        cache.put(k, content(k))
    assert cache.drop(a)  # e.g. it failed the caller's checksum
    assert cache.get(a) is None
    cache.drop_blobs([BLOB])  # tidal rmi / gc
    assert cache.get(b) is None and cache.get(c) == content(c)
    cache.clear()
    assert cache.get(c) is None


def test_caches_of_one_root_share_one_memory_tier(tmp_path: Path) -> None:
    """Every mount of the node service opens its own ChunkCache of the node's root."""
    one = ChunkCache(tmp_path / "c", 1 << 20, memory_bytes=1 << 16)
    two = ChunkCache(tmp_path / "c", 1 << 20, memory_bytes=1 << 16)
    k = key(0, 100)
    one.put(k, content(k))
    for f in _entry_files(tmp_path / "c"):
        f.unlink()
    assert two.get(k) == content(k)
    assert ChunkCache(tmp_path / "elsewhere", 1 << 20, memory_bytes=1 << 16).get(k) is None


def test_settings_size_the_memory_tier(tmp_path: Path) -> None:
    assert BlobSettings().cache_memory_bytes == DEFAULT_CACHE_MEMORY_BYTES > 0
    k = key(0, 100)
    for memory, served in ((0, False), (1 << 16, True)):
        root = tmp_path / f"m{memory}"
        settings = BlobSettings(cache_dir=root, cache_memory_bytes=memory)
        cache = settings.chunk_cache()
        cache.put(k, content(k))
        assert cache.flush(5.0)
        for f in _entry_files(root):
            f.unlink()
        assert (cache.get(k) is not None) is served


def behind(root: Path, *, quiet_s: float = 60.0, max_bytes: int = 1 << 20) -> ChunkCache:
    """A cache publishing behind its puts; with the default quiet period nothing is written
    until a flush (or ``max_bytes`` pending)."""
    return ChunkCache(root, 1 << 22, write_behind_bytes=max_bytes, write_behind_quiet_s=quiet_s)


def test_write_behind_serves_pending_entries_and_writes_them_on_flush(tmp_path: Path) -> None:
    cache = behind(tmp_path / "c")
    ks = [key(i * 1000, 1000) for i in range(5)]
    for k in ks:
        assert cache.put(k, content(k))
    assert _entry_files(tmp_path / "c") == []  # puts are still going on: nothing written
    assert all(cache.contains(k) and cache.get(k) == content(k) for k in ks)
    # every cache of the root in this process serves it (other processes read the directory)
    assert ChunkCache(tmp_path / "c", 1 << 22).get(ks[0]) == content(ks[0])
    assert cache.flush(10.0)
    assert len(_entry_files(tmp_path / "c")) == 5
    other = ChunkCache(tmp_path / "c", 1 << 22)
    assert all(other.get(k) == content(k) for k in ks)
    assert other.size_bytes == 5 * (HEADER_BYTES + 1000)
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_write_behind_writes_once_puts_pause(tmp_path: Path) -> None:
    cache = behind(tmp_path / "c", quiet_s=0.2)
    k = key(0, 100)
    cache.put(k, content(k))
    deadline = time.monotonic() + 10
    while not _entry_files(tmp_path / "c"):
        assert time.monotonic() < deadline, "the writer never published the entry"
        time.sleep(0.05)
    assert ChunkCache(tmp_path / "c", 1 << 22).get(k) == content(k)


def test_write_behind_writes_without_a_pause_once_its_bound_is_pending(tmp_path: Path) -> None:
    cache = behind(tmp_path / "c", max_bytes=4000)
    for i in range(5):  # 5,000 bytes pending > 4,000: the writer goes, quiet period or not
        k = key(i * 1000, 1000)
        cache.put(k, content(k))
    deadline = time.monotonic() + 10
    while len(_entry_files(tmp_path / "c")) < 5:
        assert time.monotonic() < deadline, _entry_files(tmp_path / "c")
        time.sleep(0.05)


def test_drops_reach_pending_entries(tmp_path: Path) -> None:
    cache = behind(tmp_path / "c")
    other_blob = sha256_digest(b"another blob")
    a, b, c = key(0, 100), key(100, 100), key(0, 100, other_blob)
    for k in (a, b, c):
        cache.put(k, content(k))
    assert cache.drop(a) and cache.get(a) is None
    cache.drop_blobs([other_blob])
    assert cache.get(c) is None and cache.get(b) == content(b)
    assert cache.flush(10.0)
    assert [p.name for p in _entry_files(tmp_path / "c")] == [b.filename()]
    cache.put(a, content(a))
    cache.clear()
    assert cache.flush(10.0) and _entry_files(tmp_path / "c") == [] and cache.get(a) is None


def test_pending_entries_are_written_at_exit_and_lost_only_to_a_kill(tmp_path: Path) -> None:
    """A process that exits writes what is pending; one killed loses it, and leaves nothing
    half-written."""
    for how, kept in (("raise SystemExit(0)", True), ("os._exit(9)", False)):
        root = tmp_path / how.split("(")[0]
        script = textwrap.dedent(
            f"""
            import os
            from tidal.blobs.chunk_cache import ChunkCache, ChunkKey
            cache = ChunkCache({str(root)!r}, 1 << 20, write_behind_bytes=1 << 20,
                               write_behind_quiet_s=60.0)
            cache.put(ChunkKey({BLOB!r}, 0, 5), b"hello")
            {how}
            """
        )
        subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
        assert (ChunkCache(root, 1 << 20).get(key(0, 5)) == b"hello") is kept, how
        assert list((root / "tmp").iterdir()) == []
