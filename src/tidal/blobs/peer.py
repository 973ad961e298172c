"""A node's chunks served to other nodes, and another node's chunks read as a BlobSource.

:class:`PeerServer` answers ``GET /v1/blobs/<digest>`` with a ``Range`` header for the layers
of the images this node has mounted. It answers from the node's chunk cache, and on a miss reads
through its own source chain (its parent peer, then the registry) and caches what it read —
which makes a miss travel up the layer's tree, as the P2P design wants. Ranges are served
chunk by chunk as the ZFile index cuts them, so the cache keys on both sides agree.

:class:`PeerBlobSource` is the reading side: a :class:`~tidal.blobs.source.BlobSource` over one
peer's HTTP API. :class:`PeerLink` wraps the source of a layer's current parent: when the
parent goes away it tells the layer's root, gets a new parent and tries once more; past that,
it raises a retryable error and the chain behind it (the registry) answers.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

from tidal.blobs.cached_source import CachedRangeSource
from tidal.blobs.p2p import RootClient, RootRing
from tidal.blobs.source import ByteRange
from tidal.errors import (
    AuthenticationError,
    BlobNotFoundError,
    ConfigError,
    P2PError,
    PeerUnreachableError,
    TidalError,
)
from tidal.ids import Digest, short_digest
from tidal.image.zfile import ZFileReader
from tidal.service.auth import ClusterAuth, ClusterToken
from tidal.service.client import plain_http_transport
from tidal.service.server import Request, Response, Route, Service, TcpServiceServer

log = logging.getLogger("tidal.blobs.peer")

PEER_TIMEOUT_S = 10.0
"""A parent that cannot serve a request in this long is treated as gone (the registry answers)."""
MAX_HOPS = 16
"""A miss may climb this many parents (a fanout-4 tree of 4 billion nodes is 16 deep)."""
PATH_HEADER = "X-Tidal-P2P-Path"
"""The nodes a miss has passed through. Parents learnt before a re-parenting can form a loop;
a node that finds itself on the path refuses at once (the asker's registry answers) instead of
waiting on its own fetch of the same chunk."""
OCTETS = "application/octet-stream"
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")
_path = threading.local()
"""The path of the request a peer server is answering in this thread; upstream reads carry it."""


class PeerServer(TcpServiceServer):
    """Serves byte ranges of the layers in ``sources`` (digest -> the node's cached source).

    ``GET /v1/blobs/<digest>`` with ``Range: bytes=START-END`` answers 206 with whole chunks;
    ``HEAD`` gives the blob's size. ``/metrics`` counts bytes and requests served by layer
    (and what the mount that owns this server registers: bytes received by source, reads).
    """

    def __init__(
        self,
        sources: Mapping[Digest, CachedRangeSource],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: ClusterToken | None = None,
    ) -> None:
        """``token``: serve members of the cluster only (:mod:`tidal.service.auth`)."""
        self.sources = sources
        self._indexes: dict[Digest, ChunkIndex] = {}
        self._lock = threading.Lock()
        self.self_url = ""
        """How other nodes name this one (set by :class:`P2PNode`): loop detection."""
        self.requests = 0
        self.bytes_served = 0
        self.loops_refused = 0
        service = Service(
            "the P2P peer server",
            [
                Route("GET", "/v1/blobs/{digest}", self._get, "/v1/blobs"),
                Route("HEAD", "/v1/blobs/{digest}", self._head, "/v1/blobs"),
            ],
            error=P2PError,
            auth=token,
        )
        self.served_by_layer: dict[Digest, tuple[int, int]] = {}
        """Requests and bytes served, per layer."""
        service.add_collector(PeerMetrics(self))
        super().__init__(host, port, service)

    # --- HTTP ------------------------------------------------------------------------------

    def _target(self, req: Request) -> tuple[Digest, CachedRangeSource]:
        digest = Digest(req.params["digest"])
        src = self.sources.get(digest)
        if src is None:
            raise BlobNotFoundError(f"this node serves no layer {short_digest(digest)}")
        return digest, src

    def _head(self, req: Request) -> Response:
        _, src = self._target(req)
        return Response(b"", 200, OCTETS, {"Content-Length": str(src.size_bytes)})

    def _get(self, req: Request) -> Response:
        digest, src = self._target(req)
        m = _RANGE_RE.match(req.headers.get("Range") or "")
        if m is None:
            raise ConfigError("a Range: bytes=START-END header is required")
        start, end = int(m.group(1)), int(m.group(2)) + 1
        path = tuple(p for p in (req.headers.get(PATH_HEADER) or "").split(",") if p)
        try:
            data = self.read_range(digest, start, end, path)
        except TidalError as exc:
            log.warning("p2p peer: cannot serve [%d, %d) of %s: %s", start, end, digest, exc)
            raise
        content_range = f"bytes {start}-{end - 1}/{src.size_bytes}"
        return Response(data, 206, OCTETS, {"Content-Range": content_range})

    def _index(self, digest: Digest, src: CachedRangeSource) -> ChunkIndex:
        with self._lock:
            index = self._indexes.get(digest)
        if index is None:
            index = ChunkIndex(ZFileReader(src, decoded_cache_chunks=0))  # tail: from the cache
            with self._lock:
                self._indexes[digest] = index
        return index

    def read_range(self, digest: Digest, start: int, end: int, path: tuple[str, ...] = ()) -> bytes:
        """Whole chunks ``[start, end)`` of a layer: from the cache, or up the tree.

        ``path``: the nodes the request came through. Reads happen in this thread, so upstream
        requests carry the path plus this node; a loop or a path past :data:`MAX_HOPS` is
        served from the cache only. Ranges that are not whole chunks (headers, trailers) are
        refused: the asker could not check a peer's copy, so those come from the registry.
        """
        src = self.sources.get(digest)
        if src is None:
            raise BlobNotFoundError(f"this node serves no layer {short_digest(digest)}")
        if not 0 <= start < end <= src.size_bytes:
            raise P2PError(f"range [{start}, {end}) is outside blob {short_digest(digest)}")
        looped = bool(self.self_url) and self.self_url in path
        cached_only = looped or len(path) >= MAX_HOPS
        with self._lock:
            index = self._indexes.get(digest)
        _path.value = (*path, self.self_url)  # before any read: opening the index reads too
        try:
            if index is None and not cached_only:
                index = self._index(digest, src)
            wanted = index.chunks(start, end) if index is not None else None
            if index is not None and wanted is None:
                raise P2PError(
                    f"[{start}, {end}) of {short_digest(digest)} is not whole chunks: "
                    "headers and trailers come from the registry (a peer's could not be checked)"
                )
            if cached_only and not (wanted and all(src.is_cached(r) for r in wanted)):
                with self._lock:
                    self.loops_refused += 1
                why = "this node is on the request's path" if looped else f"{len(path)} hops"
                raise P2PError(f"{why}: serving cached chunks only (stale parents form a loop?)")
            assert wanted is not None
            data = b"".join(src.read_at(r.start, r.length) for r in wanted)
        finally:
            _path.value = ()
        with self._lock:
            self.requests += 1
            self.bytes_served += len(data)
            n, size = self.served_by_layer.get(digest, (0, 0))
            self.served_by_layer[digest] = (n + 1, size + len(data))
        return data


class PeerMetrics:
    """The peer server's figures as Prometheus metrics, read from its counters when scraped
    (prometheus-client is not imported while the mount starts): bytes and requests served by
    layer, loops refused."""

    def __init__(self, server: PeerServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        with self.server._lock:
            by_layer = dict(self.server.served_by_layer)
            loops = self.server.loops_refused
        served = CounterMetricFamily(
            "tidal_p2p_served_bytes", "Chunk bytes served to other nodes", labels=["layer"]
        )
        requests = CounterMetricFamily(
            "tidal_p2p_served_requests", "Range requests served", labels=["layer"]
        )
        for digest, (n, size) in sorted(by_layer.items()):
            served.add_metric([digest], size)
            requests.add_metric([digest], n)
        refused = CounterMetricFamily(
            "tidal_p2p_loops_refused", "Requests refused as a loop or past the hop limit"
        )
        refused.add_metric([], loops)
        yield from (served, requests, refused)


class ChunkIndex:
    """Where a ZFile blob's stored chunks lie, for cutting a request into cache-sized pieces."""

    def __init__(self, reader: ZFileReader) -> None:
        spans = [reader.span(i) for i in range(reader.chunk_count)]
        self.starts = [sp.stored_offset for sp in spans]
        self.ends = [sp.stored_offset + sp.stored_size for sp in spans]

    def chunks(self, start: int, end: int) -> list[ByteRange] | None:
        """The chunks that make up exactly ``[start, end)``, or ``None`` if it is not whole
        chunks (a binary search, then a walk: requests are a few chunks of thousands)."""
        i = bisect.bisect_left(self.starts, start)
        if i == len(self.starts) or self.starts[i] != start:
            return None
        out: list[ByteRange] = []
        while i < len(self.starts) and self.ends[i] <= end:
            if out and out[-1].end != self.starts[i]:
                return None  # not contiguous: not what a ZFile writes
            out.append(ByteRange(self.starts[i], self.ends[i]))
            if self.ends[i] == end:
                return out
            i += 1
        return None


class PeerBlobSource:
    """Another node's layers, read over its :class:`PeerServer` API."""

    supports_ranges = True
    is_remote = True

    def __init__(
        self,
        url: str,
        timeout_s: float = PEER_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
        token: ClusterToken | None = None,
    ) -> None:
        """``token``: sign requests and accept only answers proving the same cluster token."""
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            timeout=timeout_s,
            transport=transport or plain_http_transport(),
            auth=ClusterAuth(token) if token is not None else None,
        )

    @property
    def name(self) -> str:
        return f"peer {self.url}"

    def _unavailable(self, what: str, why: object) -> P2PError:
        return P2PError(f"{self.name}: {what} failed ({why})")

    def _unreachable(self, what: str, exc: httpx.HTTPError) -> P2PError:
        if isinstance(exc, (httpx.ConnectError, httpx.TimeoutException)):
            return PeerUnreachableError(f"{self.name}: {what} failed ({exc})")
        return self._unavailable(what, exc)

    def size(self, digest: Digest) -> int:
        try:
            resp = self._http.head(f"{self.url}/v1/blobs/{digest}")
        except httpx.HTTPError as exc:
            raise self._unreachable("HEAD", exc) from None
        except AuthenticationError as exc:
            raise self._unavailable("HEAD", f"not trusted: {exc}") from None
        if resp.status_code == 404:
            raise BlobNotFoundError(f"{self.name} has no blob {short_digest(digest)}")
        if resp.status_code != 200:
            raise self._unavailable("HEAD", f"status {resp.status_code}")
        return int(resp.headers["Content-Length"])

    def has(self, digest: Digest) -> bool:
        try:
            self.size(digest)
        except BlobNotFoundError:
            return False
        return True

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            resp = self._http.get(
                f"{self.url}/v1/blobs/{digest}",
                headers={
                    "Range": f"bytes={start}-{end - 1}",
                    PATH_HEADER: ",".join(getattr(_path, "value", ())),
                },
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(f"GET [{start}, {end})", exc) from None
        except AuthenticationError as exc:
            raise self._unavailable(f"GET [{start}, {end})", f"not trusted: {exc}") from None
        if resp.status_code == 404:
            raise BlobNotFoundError(f"{self.name} has no blob {short_digest(digest)}")
        if resp.status_code != 206 or len(resp.content) != end - start:
            raise self._unavailable(
                f"GET [{start}, {end})", f"status {resp.status_code}, {len(resp.content)} bytes"
            )
        return resp.content

    def close(self) -> None:
        self._http.close()


class PeerLink:
    """The current parent of one layer in its tree, re-parented through the root on failure.

    With no parent (this node is the tree's first member, or the root is away) every read is
    a retryable miss, so the chain's next source (the registry) answers.
    """

    supports_ranges = True
    is_remote = True

    def __init__(
        self,
        digest: Digest,
        node_url: str,
        roots: RootClient,
        peer_factory: Callable[[str], PeerBlobSource] = PeerBlobSource,
    ) -> None:
        self.digest = digest
        self.node_url = node_url
        self.roots = roots
        self._factory = peer_factory
        self._lock = threading.Lock()
        self.parent: PeerBlobSource | None = None
        self.reparents = 0
        self.joined = False
        try:
            self._set(self.roots.join(digest, node_url))
            self.joined = True
        except P2PError as exc:
            log.warning("p2p: %s; reading %s from the registry", exc, short_digest(digest))

    @property
    def name(self) -> str:
        return f"p2p tree of {short_digest(self.digest)}"

    def _set(self, url: str | None) -> None:
        old, self.parent = self.parent, (self._factory(url) if url else None)
        if old is not None:
            old.close()

    def _current(self) -> PeerBlobSource:
        with self._lock:
            if self.parent is None:
                raise P2PError(f"{self.name}: this node is the tree's first member")
            return self.parent

    def _reparent(self, dead: PeerBlobSource) -> None:
        with self._lock:
            if self.parent is not dead:
                return  # another thread already moved on
            try:
                new = self.roots.report_dead(self.digest, dead.url, self.node_url)
            except P2PError as exc:
                log.warning("p2p: %s", exc)
                new = None
            log.info(
                "p2p: parent %s of %s is gone; new parent %s",
                dead.url,
                short_digest(self.digest),
                new,
            )
            self._set(new)
            self.reparents += 1

    def size(self, digest: Digest) -> int:
        return self._current().size(digest)

    def has(self, digest: Digest) -> bool:
        try:
            return self._current().has(digest)
        except P2PError:
            return False

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        """From the parent; a parent that does not answer is reported and replaced (once).

        A parent that answers but cannot serve (its own upstream failed, or it no longer
        holds the layer) stays; this read goes to the registry instead.
        """
        for _ in range(2):
            peer = self._current()
            try:
                return peer.read(digest, start, end)
            except PeerUnreachableError:
                self._reparent(peer)
            except BlobNotFoundError as exc:
                raise P2PError(str(exc)) from None
        raise P2PError(f"{self.name}: no parent could serve [{start}, {end})")

    def close(self) -> None:
        with self._lock:
            if self.joined:
                try:
                    self.roots.leave(self.digest, self.node_url)
                except P2PError as exc:
                    log.info("p2p: %s", exc)
            self._set(None)


def advertised_host(roots: list[str], configured: str | None) -> str:
    """The address other nodes reach this one at: the configured one, else the local address
    of the route to the first root (what a multi-homed node would pick for that network)."""
    if configured:
        return configured
    first = httpx.URL(roots[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((first.host, first.port or 80))  # UDP: no packet is sent
        except OSError as exc:
            raise P2PError(f"no route to the P2P root {roots[0]}: {exc.strerror or exc}") from None
        return str(probe.getsockname()[0])


class P2PNode:
    """This node's part in P2P for one lazily mounted image: a peer server for its layers and a
    :class:`PeerLink` per layer, closed (leaving the trees) with the image."""

    def __init__(
        self,
        roots: list[str],
        listen_host: str | None = None,
        listen_port: int = 0,
        advertise_host: str | None = None,
        *,
        token: ClusterToken | None = None,
    ) -> None:
        """``listen_host`` None: the advertised address (the interface towards the roots),
        never every interface unless asked for; ``token``: the cluster's, for the roots, the
        parents and this node's own server alike."""
        self.roots = RootClient(RootRing(roots), token=token)
        self.sources: dict[Digest, CachedRangeSource] = {}
        self._peer_factory = functools.partial(PeerBlobSource, token=token)
        try:
            host = advertised_host(roots, advertise_host)
            self.server = PeerServer(self.sources, listen_host or host, listen_port, token=token)
        except BaseException:
            self.roots.close()
            raise
        self.url = f"http://{host}:{self.server.port()}"
        self.server.self_url = self.url
        self.links: dict[Digest, PeerLink] = {}
        self.server.start()

    def link(self, digest: Digest) -> PeerLink:
        if digest not in self.links:
            self.links[digest] = PeerLink(digest, self.url, self.roots, self._peer_factory)
        return self.links[digest]

    def stats_doc(self) -> dict[str, object]:
        return {
            "node": self.url,
            "parents": {d: (ln.parent.url if ln.parent else None) for d, ln in self.links.items()},
            "reparents": sum(ln.reparents for ln in self.links.values()),
            "served_requests": self.server.requests,
            "served_bytes": self.server.bytes_served,
            "loops_refused": self.server.loops_refused,
        }

    def close(self) -> None:
        """Leave every tree first (children re-parent at once), then stop serving."""
        for ln in self.links.values():
            ln.close()
        self.server.stop()
        self.roots.close()
