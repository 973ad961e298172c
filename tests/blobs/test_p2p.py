"""P2P without root: the tree model, the root ring, a root and peers on loopback, real chunks.

The registry here is a counting in-memory store, so each test can say exactly what reached it.
The multi-host test over network namespaces with the CNCF registry is ``tests/blockdev``'s
``test_p2p_hosts.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.blobs.cached_source import CachedRangeSource, ZFileChunkCheck
from tidal.blobs.chain import FallbackBlobSource
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.p2p import LayerTree, RootClient, RootRing, RootServer
from tidal.blobs.peer import ChunkIndex, P2PNode, PeerBlobSource, PeerLink, PeerServer
from tidal.blobs.source import ByteRange
from tidal.errors import BlobUnavailableError, ConfigError, P2PError, PeerUnreachableError
from tidal.ids import Digest
from tidal.image.zfile import ZFileReader, compress_bytes
from tidal.testing.memory_store import MemoryBlobStore

CHUNK = 4096
pytestmark = pytest.mark.usefixtures("no_leaked_threads")


class CountingStore(MemoryBlobStore):
    """The registry stand-in: counts the bytes it serves."""

    def __init__(self) -> None:
        super().__init__("registry")
        self.bytes_read = 0
        self._count = threading.Lock()

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        with self._count:
            self.bytes_read += end - start
        return super().read(digest, start, end)


@pytest.fixture
def root() -> Iterator[RootServer]:
    server = RootServer(fanout=2).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def layer() -> tuple[CountingStore, Digest, bytes, bytes]:
    raw = os.urandom(40 * CHUNK)
    blob = compress_bytes(raw, chunk_size_bytes=CHUNK, codec="none")
    store = CountingStore()
    return store, store.put_bytes(blob), blob, raw


# --- the tree and the ring (pure) ----------------------------------------------------------


@given(
    fanout=st.integers(1, 5),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=120),
)
def test_layer_tree_stays_a_tree(fanout: int, ops: list[tuple[bool, int]]) -> None:
    tree = LayerTree(fanout)
    for join, n in ops:
        node = f"http://n{n}:1"
        if join:
            tree.join(node)
        else:
            tree.leave(node)
    children: dict[str | None, int] = {}
    for i, m in enumerate(tree.members):
        parent = tree.parent_of(m)
        assert (parent is None) == (i == 0)
        if parent is not None:
            assert tree.members.index(parent) < i  # parents come first: no cycle
        children[parent] = children.get(parent, 0) + 1
    assert all(c <= fanout for p, c in children.items() if p is not None)
    n = len(tree.members)
    if n > 1 and fanout > 1:
        assert fanout ** (tree.depth() - 1) <= n  # balanced: depth is log_fanout(n)


def test_root_ring_is_stable_and_spreads_layers() -> None:
    digests = [Digest("sha256:" + f"{i:064x}") for i in range(400)]
    three = RootRing(["http://r1:1", "http://r2:1", "http://r3:1"])
    owners = [three.root_for(d) for d in digests]
    assert owners == [three.root_for(d) for d in digests]
    assert all(owners.count(r) > 60 for r in three.roots)
    four = RootRing([*three.roots, "http://r4:1"])
    moved = sum(a != four.root_for(d) for a, d in zip(owners, digests, strict=True))
    assert 0 < moved < 200  # a new root takes a share, not a reshuffle
    with pytest.raises(ConfigError, match="not an http"):
        RootRing(["r1:7480"])
    with pytest.raises(ConfigError, match="at least one root"):
        RootRing([])


# --- a root on loopback -------------------------------------------------------------------


def test_root_api_join_leave_dead(root: RootServer, layer: tuple) -> None:
    _, digest, _, _ = layer
    client = RootClient(RootRing([root.url]))
    try:
        a, b, c, d = (f"http://10.0.0.{i}:1" for i in range(1, 5))
        assert client.join(digest, a) is None  # first member: reads the registry
        assert client.join(digest, b) == a
        assert client.join(digest, c) == a
        assert client.join(digest, d) == b  # fanout 2
        assert client.report_dead(digest, a, d) == b  # a gone: b first; c and d under it
        client.leave(digest, b)
        assert httpx.get(f"{root.url}/v1/layers").json() == {digest: [c, d]}
        bad = httpx.post(f"{root.url}/v1/layers/{digest}/join", json={"node": "nope"})
        assert bad.status_code == 400 and "http(s) URL" in bad.json()["error"]["message"]
    finally:
        client.close()
    gone = RootClient(RootRing(["http://127.0.0.1:9"]), timeout_s=0.5)
    try:
        with pytest.raises(P2PError, match="did not answer join"):
            gone.join(digest, "http://10.0.0.1:1")
    finally:
        gone.close()


# --- peers on loopback, real chunks ----------------------------------------------------------


class Node:
    """One node: a chunk cache, its P2P presence, and the layer read through the chain."""

    def __init__(self, root_url: str, store: CountingStore, tmp: Path, name: str) -> None:
        self.cache = ChunkCache(tmp / name, 64 << 20)
        self.p2p = P2PNode([root_url], "127.0.0.1", 0, "127.0.0.1")
        self.store = store
        self.chains: dict[Digest, FallbackBlobSource] = {}

    def open(self, digest: Digest) -> CachedRangeSource:
        chain = FallbackBlobSource([self.p2p.link(digest), self.store])
        self.chains[digest] = chain
        src = CachedRangeSource(chain, digest, self.store.size(digest), cache=self.cache)
        src.set_check(ZFileChunkCheck(ZFileReader(src, decoded_cache_chunks=0)))
        self.p2p.sources[digest] = src
        return src

    def close(self) -> None:
        self.p2p.close()
        for s in self.p2p.sources.values():
            s.close()


def test_chunks_flow_down_the_tree_and_the_registry_serves_each_once(
    root: RootServer, layer: tuple, tmp_path: Path
) -> None:
    store, digest, blob, raw = layer
    nodes = [Node(root.url, store, tmp_path, f"n{i}") for i in range(4)]
    try:
        srcs = [n.open(digest) for n in nodes]
        tail_bytes = store.bytes_read  # opening reads the ZFile tail: once, then from peers
        assert ZFileReader(srcs[0]).read(0, len(raw)) == raw
        after_first = store.bytes_read
        # the others read the whole layer: every chunk comes from a peer, none from the registry
        for src in srcs[1:]:
            assert ZFileReader(src).read(0, len(raw)) == raw
        assert store.bytes_read == after_first, "chunks were read from the registry twice"
        assert tail_bytes < len(blob) / 4
        by_peer = [n.chains[digest].bytes_by[n.chains[digest].sources[0].name] for n in nodes]
        assert by_peer[0] == 0 and all(b >= len(raw) for b in by_peer[1:])
        served = sum(n.p2p.server.bytes_served for n in nodes)
        assert served >= 3 * len(raw)
        top = max(nodes, key=lambda n: n.p2p.server.bytes_served).p2p.server
        metrics = httpx.get(f"{top.url}/metrics").text  # the peer's own /metrics agrees
        assert (
            f'tidal_p2p_served_bytes_total{{layer="{digest}"}} {float(top.bytes_served)}' in metrics
        )
    finally:
        for n in nodes:
            n.close()


def test_a_miss_climbs_the_tree_and_a_dead_parent_is_replaced(
    root: RootServer, layer: tuple, tmp_path: Path
) -> None:
    store, digest, _, raw = layer
    a, b, c = (Node(root.url, store, tmp_path, n) for n in ("a", "b", "c"))
    closed: list[Node] = []
    try:
        sa, sb = a.open(digest), b.open(digest)
        c_root_parent = RootClient(RootRing([root.url]))
        # fanout 2 with a, b, c: c's parent is a. Make c a grandchild: a -> b -> c.
        c_root_parent.leave(digest, a.p2p.url)
        c_root_parent.join(digest, a.p2p.url)  # order now b, a; c joins under b
        c_root_parent.close()
        sc = c.open(digest)
        assert c.p2p.links[digest].parent is not None
        assert c.p2p.links[digest].parent.url == b.p2p.url
        before = store.bytes_read
        # nobody read it yet: c's miss goes to b, whose miss goes to the registry (b is first now)
        assert ZFileReader(sc).read(0, 8 * CHUNK) == raw[: 8 * CHUNK]
        assert store.bytes_read - before >= 8 * CHUNK
        assert sb.stats.bytes_fetched >= 8 * CHUNK  # b fetched (and cached) on c's behalf
        # b dies: c's next miss reports it, is re-parented (to a) and still gets its bytes
        b.close()
        closed.append(b)
        assert ZFileReader(sc).read(8 * CHUNK, 8 * CHUNK) == raw[8 * CHUNK : 16 * CHUNK]
        link = c.p2p.links[digest]
        assert link.reparents >= 1 or link.parent is None or link.parent.url == a.p2p.url
        assert sa.size_bytes > 0
    finally:
        for n in (a, b, c):
            if n not in closed:
                n.close()


def test_a_loop_of_stale_parents_ends_in_the_registry(layer: tuple, tmp_path: Path) -> None:
    """Two peers each believing the other is its parent: the hop limit breaks the chase."""
    store, digest, _, raw = layer
    servers, sources, peers = [], [], []
    try:
        links: list[FallbackBlobSource] = []
        for name in ("x", "y"):
            cache = ChunkCache(tmp_path / name, 64 << 20)
            holder: dict[Digest, CachedRangeSource] = {}
            server = PeerServer(holder, "127.0.0.1", 0).start()
            server.self_url = f"http://127.0.0.1:{server.port()}"
            servers.append(server)
            links.append(FallbackBlobSource([store]))  # placeholder until both ports are known
            sources.append((cache, holder))
        for i, (cache, holder) in enumerate(sources):
            other = PeerBlobSource(f"http://127.0.0.1:{servers[1 - i].port()}")
            peers.append(other)
            loop_only = FallbackBlobSource([other])  # no registry behind: the loop must end
            src = CachedRangeSource(loop_only, digest, store.size(digest), cache=cache)
            holder[digest] = src
        # seed the tails so that both readers can open (the tail is not what loops)
        tail_start = store.size(digest) - 4096
        t0 = time.monotonic()
        with pytest.raises(BlobUnavailableError):
            servers[0].read_range(digest, tail_start, store.size(digest))
        assert time.monotonic() - t0 < 5  # refused at once, no wait for a timeout
        assert servers[0].loops_refused == 1  # x -> y -> x: x finds itself on the path
        assert raw  # the layer itself is untouched
    finally:
        for p in peers:
            p.close()
        for s in servers:
            s.stop()
        for _, holder in sources:
            for src in holder.values():
                src.close()


def test_peer_source_errors(root: RootServer, layer: tuple) -> None:
    store, digest, _, _ = layer
    server = PeerServer({}, "127.0.0.1", 0).start()
    peer = PeerBlobSource(f"http://127.0.0.1:{server.port()}")
    try:
        assert not peer.has(digest)
        resp = httpx.get(f"http://127.0.0.1:{server.port()}/v1/blobs/{digest}")
        assert resp.status_code == 404
    finally:
        peer.close()
        server.stop()
    gone = PeerBlobSource(f"http://127.0.0.1:{server.port()}", timeout_s=0.5)
    try:
        with pytest.raises(PeerUnreachableError):
            gone.read(digest, 0, 10)
    finally:
        gone.close()
    # a link whose root is unreachable just reads nothing from peers: the registry answers
    link = PeerLink(digest, "http://127.0.0.1:1", RootClient(RootRing(["http://127.0.0.1:9"]), 0.5))
    try:
        assert not link.joined and link.parent is None
        chain = FallbackBlobSource([link, store])
        assert chain.read(digest, 0, 5) == store.read(digest, 0, 5)
    finally:
        link.close()
        link.roots.close()


class LyingStore(CountingStore):
    """Flips every byte of the blob's first half (its tail stays true, so the blob opens):
    what a broken or hostile peer would serve."""

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        data = super().read(digest, start, end)
        return bytes(b ^ 0xFF for b in data) if start < self.size(digest) // 2 else data


def test_a_peer_serving_corrupt_chunks_is_skipped(
    root: RootServer, layer: tuple, tmp_path: Path
) -> None:
    store, digest, blob, raw = layer
    liar_store = LyingStore()
    liar_store.put_bytes(blob)
    liar = Node(root.url, liar_store, tmp_path, "liar")
    honest = Node(root.url, store, tmp_path, "honest")
    try:
        bad = liar.open(digest)  # first member: its "registry" lies, and it checks nothing
        bad.set_check(None)
        good = honest.open(digest)  # opened through the liar: its tail is read from the store
        assert honest.p2p.links[digest].parent is not None
        before = store.bytes_read
        assert ZFileReader(good).read(0, 4 * CHUNK) == raw[: 4 * CHUNK]
        assert store.bytes_read - before >= 4 * CHUNK  # the good bytes came from the registry
        assert good.stats.check_failures >= 1  # the peer's bytes were seen and refused
    finally:
        honest.close()
        liar.close()


def test_chunk_index_cuts_requests_into_whole_chunks(layer: tuple) -> None:
    store, digest, blob, _ = layer
    src = CachedRangeSource(store, digest, len(blob), cache=None)
    index = ChunkIndex(ZFileReader(src, decoded_cache_chunks=0))
    s, e = index.starts, index.ends
    assert index.chunks(s[3], e[5]) == [ByteRange(s[i], e[i]) for i in (3, 4, 5)]
    assert index.chunks(s[0], e[0]) == [ByteRange(s[0], e[0])]
    assert index.chunks(s[3] + 1, e[5]) is None  # not on a chunk boundary
    assert index.chunks(s[3], e[5] - 1) is None
    assert index.chunks(0, s[0]) is None  # the header
    assert index.chunks(e[-1], len(blob)) is None  # the trailer
    src.close()
