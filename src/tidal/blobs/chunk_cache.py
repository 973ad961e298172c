"""The node's persistent chunk cache: stored byte ranges of blobs, shared by all images.

Content-addressed: an entry's key is (blob digest, stored offset, length), so two images that
share a layer share its cached chunks, and an entry can never be stale. Layout::

    ROOT/entries/<hex[:2]>/<hex>.<offset>.<length>   16-byte header + the bytes
    ROOT/tmp/                                        entries being written
    ROOT/lock                                        flock (publish, unlink, evict) and
                                                     the byte total of all entries

Safety without a daemon:

- Writers write a temporary file and ``rename`` it into place, so readers see a whole entry or
  none. The header carries the length and a crc32 of the bytes, so an entry torn by a power
  loss (rename persisted, data not) is detected, dropped and counted — never served.
- Readers take no lock: an entry unlinked by an evictor while open stays readable.
- Publishing (rename), removing and evicting happen under an exclusive ``flock`` that also
  guards a shared byte counter, so every process and thread sees the same total. The put that
  pushes it over capacity rescans the directory and deletes least-recently-used entries (by
  mtime, which every hit refreshes) down to a low-water mark, so eviction work is amortised.
  The data itself is written outside the lock; the critical section is a rename and a counter.

In front of the directory, a process may keep recent entries in memory (``memory_bytes``,
``[blobs] cache_memory_bytes``; one LRU per cache root, shared by every ChunkCache of that
root in the process). A chunk a prefetch just stored is then served to the FUSE disk without
a file open, read and ``utime`` per hit, which on the node's journalled root file system cost
0.4 ms a hit while 16 prefetch threads were publishing (measured in the node service during
bench_peers' imports run). Memory hits leave the entry's on-disk LRU position as it is.

A process may also publish its entries behind the put (``write_behind_bytes``, ``[blobs]
cache_write_behind_bytes``): a put then only hands the entry to the cache root's one writer
thread, which writes what is pending once puts pause (a trace replay has ended) or once that
many bytes wait, one lock for a whole batch. In bench_peers' imports run the directory's file
work under 16 prefetch threads (a temporary file, ``utime``, ``flock`` and rename per chunk:
~5 ms a put) made the replay take 1.7-2.0 s for 44 MB on a 1 Gbit/s link; with nothing written
while it ran it took 1.0 s. Pending entries are served to this process like written ones; a
process that dies (SIGKILL) before they are written loses only them: they are fetched again.

Counters (hits, misses, bytes, evictions, corrupt entries) let tests and ``tidal image stats``
assert read amplification and cache effectiveness.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cachetools

from tidal.errors import CacheError
from tidal.ids import Digest, parse_digest

log = logging.getLogger(__name__)

ENTRY_MAGIC = b"TCC1"
_HEADER = struct.Struct("<4sQI")
HEADER_BYTES = _HEADER.size  # 16
DEFAULT_LOW_WATER_RATIO = 0.9
"""Evict down to 90 % of capacity: one rescan buys room for many more puts."""
STALE_TMP_S = 600.0
"""Temporary files older than this belong to a crashed writer and are removed on open."""
WRITE_BEHIND_QUIET_S = 0.25
"""A pause in puts this long lets the writer publish what is pending: a trace replay puts
entries every few milliseconds while it runs."""
WRITE_BEHIND_BATCH = 256
"""Entries published under one lock."""
EXIT_FLUSH_S = 10.0
"""At interpreter exit, how long the pending entries may take to be written."""


@dataclass(frozen=True, order=True)
class ChunkKey:
    """A stored byte range of a blob: what the format layer asks for, and what is cached."""

    digest: Digest
    offset: int
    length: int

    def filename(self) -> str:
        return f"{self.digest.split(':', 1)[1]}.{self.offset}.{self.length}"


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one ChunkCache object's counters (this process's view)."""

    hits: int
    misses: int
    bytes_hit: int
    puts: int
    bytes_stored: int
    evictions: int
    bytes_evicted: int
    corrupt_dropped: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class _Entry:
    path: Path
    size_bytes: int
    mtime_ns: int


class MemoryTier:
    """Recent entries' bytes, at most ``capacity_bytes`` of them, least recently used out
    first (``cachetools.LRUCache`` sized by ``len``, under a lock: it is not thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        self._lru: cachetools.LRUCache[ChunkKey, bytes] = cachetools.LRUCache(
            capacity_bytes, getsizeof=len
        )
        self._lock = threading.Lock()

    def get(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            return self._lru.get(key)

    def __contains__(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._lru

    def put(self, key: ChunkKey, data: bytes) -> None:
        with self._lock, contextlib.suppress(ValueError):  # larger than the tier: not kept
            self._lru[key] = data

    def drop(self, key: ChunkKey) -> bool:
        """Forget ``key``; returns whether it was here."""
        with self._lock:
            return self._lru.pop(key, None) is not None

    def drop_digests(self, digests: Iterable[Digest]) -> None:
        wanted = set(digests)
        with self._lock:
            for key in [k for k in self._lru if k.digest in wanted]:
                del self._lru[key]

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()


_TIERS: dict[str, MemoryTier] = {}
_TIERS_LOCK = threading.Lock()


def memory_tier(root: Path, capacity_bytes: int) -> MemoryTier:
    """The process's memory tier of the cache at ``root``, made on first use with
    ``capacity_bytes`` (every cache of a process comes from the same settings)."""
    key = str(root.resolve())
    with _TIERS_LOCK:
        tier = _TIERS.get(key)
        if tier is None:
            tier = _TIERS[key] = MemoryTier(capacity_bytes)
        return tier


class WriteBehind:
    """Entries put but not yet in the directory, and the one thread that writes them.

    The writer waits until puts pause for ``quiet_s`` or ``max_bytes`` are pending, then
    publishes in batches; a put that finds twice ``max_bytes`` pending waits for the writer
    (memory stays bounded when the directory is slower than the network).
    """

    def __init__(self, max_bytes: int, quiet_s: float = WRITE_BEHIND_QUIET_S) -> None:
        self.max_bytes = max_bytes
        self.quiet_s = quiet_s
        self._pending: dict[ChunkKey, tuple[ChunkCache, bytes]] = {}
        self._bytes = 0
        self._last_put = 0.0
        self._writing: set[ChunkKey] = set()
        self._dropped_while_writing: set[ChunkKey] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, cache: ChunkCache, key: ChunkKey, data: bytes) -> None:
        with self._cond:
            if key in self._pending:
                return
            self._pending[key] = (cache, data)
            self._bytes += len(data)
            self._last_put = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tidal-cache-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            while self._bytes > 2 * self.max_bytes:
                self._cond.wait()

    def get(self, key: ChunkKey) -> bytes | None:
        with self._cond:
            found = self._pending.get(key)
        return found[1] if found is not None else None

    def __contains__(self, key: ChunkKey) -> bool:
        with self._cond:
            return key in self._pending

    def pending_of(self, digest: Digest) -> list[ChunkKey]:
        with self._cond:
            return [k for k in self._pending if k.digest == digest]

    def discard(self, wanted: Callable[[ChunkKey], bool]) -> list[ChunkKey]:
        """Forget the pending entries ``wanted`` picks (returned); those being written now
        are removed again once written."""
        with self._cond:
            gone = [k for k in self._pending if wanted(k)]
            for key in gone:
                self._bytes -= len(self._pending.pop(key)[1])
                if key in self._writing:
                    self._dropped_while_writing.add(key)
            self._cond.notify_all()
        return gone

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write everything pending now; False if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._last_put = 0.0  # no quiet period to wait for
            self._cond.notify_all()
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
                self._last_put = 0.0
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._pending:
                        self._cond.wait()
                        continue
                    idle = time.monotonic() - self._last_put
                    if idle >= self.quiet_s or self._bytes >= self.max_bytes:
                        break
                    self._cond.wait(self.quiet_s - idle)
                batch = list(self._pending.items())[:WRITE_BEHIND_BATCH]
                self._writing = {k for k, _ in batch}
            by_cache: dict[int, tuple[ChunkCache, list[tuple[ChunkKey, bytes]]]] = {}
            for key, (cache, data) in batch:
                by_cache.setdefault(id(cache), (cache, []))[1].append((key, data))
            for cache, items in by_cache.values():
                try:
                    cache._write_entries(items)
                except CacheError as exc:
                    log.warning("%s; %d cached entries stay in memory only", exc, len(items))
            with self._cond:
                for key, (cache, data) in batch:
                    if self._pending.get(key, (None, None))[1] is data:
                        del self._pending[key]
                        self._bytes -= len(data)
                    if key in self._dropped_while_writing:
                        cache._unlink(cache._path(key))
                self._writing = set()
                self._dropped_while_writing = set()
                self._cond.notify_all()


_WRITERS: dict[str, WriteBehind] = {}


def write_behind(root: Path, max_bytes: int, quiet_s: float = WRITE_BEHIND_QUIET_S) -> WriteBehind:
    """The process's writer of the cache at ``root``, made on first use."""
    key = str(root.resolve())
    with _TIERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            writer = _WRITERS[key] = WriteBehind(max_bytes, quiet_s)
        return writer


@atexit.register
def _flush_at_exit() -> None:
    with _TIERS_LOCK:
        writers = list(_WRITERS.values())
    for writer in writers:
        if not writer.flush(EXIT_FLUSH_S):
            log.warning("the chunk cache writer did not finish within %.0f s", EXIT_FLUSH_S)


class ChunkCache:
    """A bounded, LRU, crash-safe, multi-process chunk cache in a directory."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        low_water_ratio: float = DEFAULT_LOW_WATER_RATIO,
        fsync: bool = False,
        memory_bytes: int = 0,
        write_behind_bytes: int = 0,
        write_behind_quiet_s: float = WRITE_BEHIND_QUIET_S,
    ) -> None:
        """``memory_bytes``: also keep up to this many bytes of recent entries in this
        process's memory (0: none). ``write_behind_bytes``: publish entries behind the put,
        up to this many bytes pending (0: each put writes its entry before it returns), written
        once puts pause for ``write_behind_quiet_s``."""
        if capacity_bytes <= 0:
            raise CacheError(f"chunk cache capacity must be positive, got {capacity_bytes}")
        if not 0.0 < low_water_ratio <= 1.0:
            raise CacheError(f"low-water ratio must be in (0, 1], got {low_water_ratio}")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.low_water_bytes = int(capacity_bytes * low_water_ratio)
        self._fsync = fsync
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        try:
            self._entries.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create the chunk cache in {self.root}: {exc.strerror}; "
                "set [blobs] cache_dir to a writable directory"
            ) from exc
        self._lock = threading.Lock()
        self._tls = threading.local()  # the lock fd, while this thread holds the cache lock
        self._made_dirs: set[Path] = set()
        self._clock_ns = 0
        self._hits = self._misses = self._bytes_hit = 0
        self._puts = self._bytes_stored = 0
        self._evictions = self._bytes_evicted = self._corrupt = 0
        self._memory = memory_tier(self.root, memory_bytes) if memory_bytes > 0 else None
        self._writer = (
            write_behind(self.root, write_behind_bytes, write_behind_quiet_s)
            if write_behind_bytes
            else None
        )
        self._root_key = str(self.root.resolve())
        self._remove_stale_tmp()
        with self._exclusive():
            if self._read_size() is None:
                self._write_size(sum(e.size_bytes for e in self._scan()))

    # --- paths and time -------------------------------------------------------------------

    def _path(self, key: ChunkKey) -> Path:
        hexpart = parse_digest(key.digest).split(":", 1)[1]
        return self._entries / hexpart[:2] / key.filename()

    def _now_ns(self) -> int:
        """Strictly increasing in this process, so LRU order is exact within it."""
        with self._lock:
            self._clock_ns = max(time.time_ns(), self._clock_ns + 1)
            return self._clock_ns

    def _touch(self, path: Path) -> None:
        t = self._now_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(t, t))

    # --- get / put / drop -----------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes | None:
        """The cached bytes of ``key``, or ``None``; a damaged entry is dropped and missed."""
        if self._memory is not None:
            data = self._memory.get(key)
            if data is not None:
                with self._lock:
                    self._hits += 1
                    self._bytes_hit += len(data)
                return data
        if (writer := self._behind()) is not None:
            data = writer.get(key)
            if data is not None:
                with self._lock:
                    self._hits += 1
                    self._bytes_hit += len(data)
                return data
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            self._count_miss()
            return None
        data = self._decode(blob, key)
        if data is None:
            self._unlink(path)
            with self._lock:
                self._corrupt += 1
                self._misses += 1
            return None
        self._touch(path)
        if self._memory is not None:
            self._memory.put(key, data)
        with self._lock:
            self._hits += 1
            self._bytes_hit += len(data)
        return data

    def _count_miss(self) -> None:
        with self._lock:
            self._misses += 1

    @staticmethod
    def _decode(blob: bytes, key: ChunkKey) -> bytes | None:
        if len(blob) < HEADER_BYTES:
            return None
        magic, length, crc = _HEADER.unpack_from(blob)
        data = blob[HEADER_BYTES:]
        if magic != ENTRY_MAGIC or length != key.length or len(data) != length:
            return None
        if zlib.crc32(data) != crc:
            return None
        return data

    def contains(self, key: ChunkKey) -> bool:
        """Whether an entry exists (not checked, not counted, LRU position unchanged)."""
        return (
            (self._memory is not None and key in self._memory)
            or key in (self._behind() or ())
            or self._path(key).exists()
        )

    def put(self, key: ChunkKey, data: bytes) -> bool:
        """Store ``data`` under ``key``; returns False if it can never fit."""
        if len(data) != key.length:
            raise CacheError(
                f"chunk cache entry {key.filename()} is {key.length} bytes by its key "
                f"but {len(data)} were given"
            )
        size = HEADER_BYTES + len(data)
        if size > self.capacity_bytes:
            return False
        if self._memory is not None:
            self._memory.put(key, data)
        if self._writer is not None:
            self._writer.add(self, key, data)
        else:
            self._write_entries([(key, data)])
        with self._lock:
            self._puts += 1
            self._bytes_stored += len(data)
        return True

    def _write_entries(self, items: list[tuple[ChunkKey, bytes]]) -> None:
        """Write each entry to a temporary file, then publish them all under one lock."""
        written: list[tuple[str, Path, int]] = []
        try:
            try:
                for key, data in items:
                    path = self._path(key)
                    if path.parent not in self._made_dirs:
                        path.parent.mkdir(exist_ok=True)
                        self._made_dirs.add(path.parent)
                    # unique while this thread writes it: no random name to make and retry
                    tmp = f"{self._tmp}/{key.filename()[:16]}.{self._tmp_tag()}.{len(written)}"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                    written.append((tmp, path, HEADER_BYTES + len(data)))
                    try:
                        os.writev(
                            fd, [_HEADER.pack(ENTRY_MAGIC, len(data), zlib.crc32(data)), data]
                        )
                        if self._fsync:
                            os.fsync(fd)
                        t = self._now_ns()
                        os.utime(fd, ns=(t, t))
                    finally:
                        os.close(fd)
                with self._exclusive():
                    total = self._read_size() or 0
                    for i, (tmp, path, size) in enumerate(written):
                        existed = path.exists()  # a replaced entry adds nothing to the total
                        os.replace(tmp, path)
                        written[i] = ("", path, size)
                        total += 0 if existed else size
                    if total > self.capacity_bytes:
                        self._evict_locked(self.low_water_bytes)
                    else:
                        self._write_size(total)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.evict_to(self.low_water_bytes // 2)
                raise CacheError(
                    f"cannot write to the chunk cache {self.root}: {exc.strerror}"
                ) from exc
        finally:
            for tmp, _path, _size in written:
                if tmp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)

    def _behind(self) -> WriteBehind | None:
        """This process's writer of the root, if any cache of it publishes behind its puts:
        every cache of the root serves and drops its pending entries."""
        return _WRITERS.get(self._root_key)

    @staticmethod
    def _tmp_tag() -> str:
        return f"{os.getpid()}.{threading.get_native_id()}"

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write the entries still pending behind puts (a no-op without write-behind)."""
        writer = self._behind()
        return writer.flush(timeout_s) if writer is not None else True

    def drop(self, key: ChunkKey) -> bool:
        """Remove one entry (e.g. it failed the caller's checksum); returns whether it existed."""
        in_memory = self._memory is not None and self._memory.drop(key)
        writer = self._behind()
        pending = writer is not None and key in writer
        if writer is not None:
            writer.discard(lambda k: k == key)
        return self._unlink(self._path(key)) or in_memory or pending

    def _unlink(self, path: Path) -> bool:
        with self._exclusive():
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            self._write_size(max(0, (self._read_size() or 0) - size))
        return True

    # --- eviction -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The cache-wide lock: a fresh open file per use, so it excludes threads too.

        The lock file also holds the shared byte counter (8 bytes), read and written only
        while the lock is held.
        """
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._tls.fd = fd
            try:
                yield
            finally:
                self._tls.fd = None
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _read_size(self) -> int | None:
        raw = os.pread(self._tls.fd, 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else None

    def _write_size(self, total: int) -> None:
        os.pwrite(self._tls.fd, total.to_bytes(8, "little"), 0)

    def _scan(self) -> list[_Entry]:
        out: list[_Entry] = []
        try:
            subdirs = list(os.scandir(self._entries))
        except FileNotFoundError:
            return out
        for sub in subdirs:
            if not sub.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError):
                for ent in os.scandir(sub.path):
                    with contextlib.suppress(FileNotFoundError):
                        st = ent.stat()
                        out.append(_Entry(Path(ent.path), st.st_size, st.st_mtime_ns))
        return out

    def evict_to(self, target_bytes: int) -> int:
        """Delete least-recently-used entries until at most ``target_bytes`` remain.

        Rescans the directory under the lock, so the bound holds for every process sharing
        the cache. Returns the number of entries removed.
        """
        with self._exclusive():
            return self._evict_locked(target_bytes)

    def _evict_locked(self, target_bytes: int) -> int:
        removed = 0
        freed = 0
        entries = self._scan()
        total = sum(e.size_bytes for e in entries)
        entries.sort(key=lambda e: (e.mtime_ns, e.path.name))
        for e in entries:
            if total <= target_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                e.path.unlink()
                removed += 1
                freed += e.size_bytes
            total -= e.size_bytes
        self._write_size(total)
        with self._lock:
            self._evictions += removed
            self._bytes_evicted += freed
        return removed

    def clear(self) -> None:
        if self._memory is not None:
            self._memory.clear()
        if (writer := self._behind()) is not None:
            writer.discard(lambda k: True)
        self.evict_to(0)

    def _blob_entries(self, digest: Digest) -> list[_Entry]:
        hexpart = parse_digest(digest).split(":", 1)[1]
        out: list[_Entry] = []
        with contextlib.suppress(FileNotFoundError):
            for ent in os.scandir(self._entries / hexpart[:2]):
                if ent.name.startswith(hexpart + "."):
                    with contextlib.suppress(FileNotFoundError):
                        st = ent.stat()
                        out.append(_Entry(Path(ent.path), st.st_size, st.st_mtime_ns))
        return out

    def blob_bytes(self, digest: Digest) -> int:
        """Bytes cached of one blob (entries on disk now and this process's pending ones,
        headers included)."""
        on_disk = {e.path.name: e.size_bytes for e in self._blob_entries(digest)}
        writer = self._behind()
        pending = writer.pending_of(digest) if writer is not None else []
        extra = sum(HEADER_BYTES + k.length for k in pending if k.filename() not in on_disk)
        return sum(on_disk.values()) + extra

    def drop_blobs(self, digests: Iterable[Digest]) -> tuple[int, int]:
        """Remove every entry of these blobs (no image needs them any more): (entries, bytes)."""
        removed = freed = pending = pending_bytes = 0
        digests = list(digests)
        if self._memory is not None:
            self._memory.drop_digests(digests)
        if (writer := self._behind()) is not None:
            wanted = set(digests)
            for k in writer.discard(lambda k: k.digest in wanted):
                if not self._path(k).exists():  # else counted below, with its file
                    pending += 1
                    pending_bytes += HEADER_BYTES + k.length
        with self._exclusive():
            for digest in digests:
                for e in self._blob_entries(digest):
                    with contextlib.suppress(FileNotFoundError):
                        e.path.unlink()
                        removed += 1
                        freed += e.size_bytes
            self._write_size(max(0, (self._read_size() or 0) - freed))
        return removed + pending, freed + pending_bytes

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        with contextlib.suppress(FileNotFoundError):
            for ent in os.scandir(self._tmp):
                with contextlib.suppress(FileNotFoundError):
                    if ent.stat().st_mtime < cutoff:
                        os.unlink(ent.path)

    # --- introspection --------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes on disk now (a directory scan on each access: exact across processes)."""
        return sum(e.size_bytes for e in self._scan())

    def entry_count(self) -> int:
        return len(self._scan())

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                bytes_hit=self._bytes_hit,
                puts=self._puts,
                bytes_stored=self._bytes_stored,
                evictions=self._evictions,
                bytes_evicted=self._bytes_evicted,
                corrupt_dropped=self._corrupt,
            )
