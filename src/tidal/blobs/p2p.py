"""On-demand P2P: a distribution tree per layer, kept by root nodes chosen by consistent hashing.

Every node that mounts a pulled image serves the chunks it holds to other nodes
(:mod:`tidal.blobs.peer`). For each layer, the nodes that read it form a tree: a node's chunk
miss goes to its parent, whose miss goes to its own parent, up to the tree's first member, which
reads from the registry. Root nodes keep the trees: several of them (per data centre, for
availability), each owning the layers that a consistent-hash ring over their addresses gives
it, so any node finds a layer's root without asking anyone.

- :class:`LayerTree` (pure): members in join order, ``fanout`` children each, so a tree of n
  nodes is ``log_fanout(n)`` deep and the registry serves each chunk once per tree.
- :class:`RootRing`: which root owns a layer (``uhashring``; adding a root moves ~1/n layers).
- :class:`RootServer` / :class:`RootClient`: the root's small HTTP API (join, leave, report a dead
  parent, list); trees live in the root's memory — a restarted root rebuilds them as nodes
  re-join, and until then nodes read from the registry, so a root outage costs bandwidth, never
  data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from uhashring import HashRing

from tidal.errors import AuthenticationError, ConfigError, NotFoundError, P2PError
from tidal.ids import Digest, parse_digest
from tidal.service.auth import ClusterAuth, ClusterToken
from tidal.service.client import plain_http_transport
from tidal.service.server import Request, Route, Service, TcpServiceServer
from tidal.service.wire import error_from_response

log = logging.getLogger("tidal.blobs.p2p")

DEFAULT_FANOUT = 4
"""Children per node: a 1,000-node tree is 5 levels deep, and a parent serves at most four
readers of each chunk at once (its link, not the registry's, is the shared resource)."""
ROOT_TIMEOUT_S = 2.0
"""A root that does not answer this fast is skipped: the node reads from the registry."""


@dataclass
class LayerTree:
    """The nodes reading one layer, in join order; node ``i``'s parent is node ``(i-1)//fanout``.

    A node that leaves (or is reported dead) is removed and the order closes up, so the tree
    stays complete and balanced; nodes learn their new parent when they next ask.
    """

    fanout: int = DEFAULT_FANOUT
    members: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fanout < 1:
            raise ConfigError(f"a layer tree needs a fanout of at least 1, got {self.fanout}")

    def parent_of(self, node: str) -> str | None:
        """The member ``node`` reads from; ``None`` for the first member (the registry)."""
        i = self.members.index(node)
        return None if i == 0 else self.members[(i - 1) // self.fanout]

    def join(self, node: str) -> str | None:
        if node not in self.members:
            self.members.append(node)
        return self.parent_of(node)

    def leave(self, node: str) -> bool:
        if node in self.members:
            self.members.remove(node)
            return True
        return False

    def depth(self) -> int:
        """Edges from the first member to the deepest one."""
        d, i = 0, len(self.members) - 1
        while i > 0:
            i = (i - 1) // self.fanout
            d += 1
        return d


class RootRing:
    """Which root node keeps a layer's tree: a consistent-hash ring over the roots' URLs."""

    def __init__(self, roots: Sequence[str]) -> None:
        urls = [r.rstrip("/") for r in roots]
        if not urls:
            raise ConfigError("P2P needs at least one root node URL ([blobs] p2p_roots)")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"P2P root {u!r} is not an http(s) URL")
        self.roots = tuple(urls)
        self._ring = HashRing(nodes=list(self.roots))

    def root_for(self, digest: Digest) -> str:
        return str(self._ring.get_node(str(digest)))


# --- the root's HTTP API ----------------------------------------------------------------------


class RootState:
    """All trees a root keeps; thread-safe. Pure apart from the lock."""

    def __init__(self, fanout: int = DEFAULT_FANOUT) -> None:
        self.fanout = fanout
        self.trees: dict[str, LayerTree] = {}
        self._lock = threading.Lock()

    def join(self, digest: str, node: str) -> str | None:
        with self._lock:
            tree = self.trees.setdefault(digest, LayerTree(self.fanout))
            return tree.join(node)

    def leave(self, digest: str, node: str) -> None:
        with self._lock:
            tree = self.trees.get(digest)
            if tree is not None:
                tree.leave(node)
                if not tree.members:
                    del self.trees[digest]

    def dead(self, digest: str, dead: str, reporter: str) -> str | None:
        """``reporter`` could not reach ``dead``: drop it and answer the reporter's new parent."""
        with self._lock:
            tree = self.trees.setdefault(digest, LayerTree(self.fanout))
            if tree.leave(dead):
                log.info(
                    "p2p root: %s dropped from the tree of %s (reported by %s)",
                    dead,
                    digest,
                    reporter,
                )
            return tree.join(reporter)

    def snapshot(self) -> dict[str, list[str]]:
        with self._lock:
            return {d: list(t.members) for d, t in self.trees.items()}


class RootServer(TcpServiceServer):
    """A root node: ``start()`` serves in a thread (tests), ``serve_forever()`` blocks (CLI).

    ``GET /v1/layers`` lists the trees; ``POST /v1/layers/<digest>/{join,leave,dead}`` with
    ``{"node": URL}`` (and ``"dead": URL``) changes one; ``/healthz`` and ``/metrics``
    (layers, members, joins, dead reports) come with the service kit.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        fanout: int = DEFAULT_FANOUT,
        *,
        token: ClusterToken | None = None,
    ) -> None:
        """``token``: only members of the cluster may join or list (see
        :mod:`tidal.service.auth`); None serves anyone (tests on loopback)."""
        from prometheus_client import Counter, Gauge  # here: nodes import this module too

        self.state = RootState(fanout)
        service = Service(
            "the P2P root",
            [
                Route("GET", "/v1/layers", lambda _: self.state.snapshot()),
                Route("POST", "/v1/layers/{digest}/{verb}", self._change, "/v1/layers/{verb}"),
            ],
            error=P2PError,
            auth=token,
        )
        self.changes = Counter(
            "tidal_p2p_root_changes",
            "Tree changes asked of this root, by verb",
            ["verb"],
            registry=service.registry,
        )
        for verb in ("join", "leave", "dead"):
            self.changes.labels(verb)
        layers = Gauge("tidal_p2p_root_layers", "Layers with a tree", registry=service.registry)
        layers.set_function(lambda: len(self.state.trees))
        members = Gauge(
            "tidal_p2p_root_members", "Members over all trees", registry=service.registry
        )
        members.set_function(lambda: sum(len(m) for m in self.state.snapshot().values()))
        super().__init__(host, port, service)

    def _change(self, req: Request) -> dict[str, Any]:
        digest = parse_digest(req.params["digest"])
        verb = req.params["verb"]
        if verb not in ("join", "leave", "dead"):
            raise NotFoundError(f"no tree verb {verb!r}; use join, leave or dead")
        body = req.json_object()
        if "node" not in body:
            raise ConfigError(f'{verb} needs {{"node": URL}}')
        node = str(body["node"])
        if not node.startswith(("http://", "https://")):
            raise ConfigError(f"node {node!r} is not an http(s) URL")
        self.changes.labels(verb).inc()
        if verb == "join":
            return {"parent": self.state.join(digest, node)}
        if verb == "leave":
            self.state.leave(digest, node)
            return {"ok": True}
        return {"parent": self.state.dead(digest, str(body.get("dead", "")), node)}


class RootClient:
    """A node's side of the roots' API. Failures raise :class:`P2PError` (callers then use the
    registry alone); nothing here is needed for correctness, only for saving bandwidth."""

    def __init__(
        self,
        ring: RootRing,
        timeout_s: float = ROOT_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
        token: ClusterToken | None = None,
    ) -> None:
        self.ring = ring
        self._http = httpx.Client(
            timeout=timeout_s,
            transport=transport or plain_http_transport(),
            auth=ClusterAuth(token) if token is not None else None,
        )

    def _post(self, digest: Digest, verb: str, body: dict[str, str]) -> dict[str, Any]:
        root = self.ring.root_for(digest)
        try:
            resp = self._http.post(f"{root}/v1/layers/{digest}/{verb}", json=body)
        except httpx.HTTPError as exc:
            raise P2PError(f"P2P root {root} did not answer {verb} for {digest}: {exc}") from None
        except AuthenticationError as exc:
            raise P2PError(f"P2P root {root} is not trusted: {exc}") from None
        refused = error_from_response(resp, fallback=P2PError, what=f"P2P root {root}")
        if refused is not None:  # still a P2PError: a root's refusal never fails a read
            raise P2PError(f"P2P root {root} refused {verb} for {digest}: {refused}") from None
        try:
            doc = resp.json()
        except ValueError as exc:
            raise P2PError(f"P2P root {root} sent invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise P2PError(f"P2P root {root} sent {doc!r}, not an object")
        return doc

    def layers(self, root: str) -> dict[str, list[str]]:
        """The trees ``root`` keeps: each layer's members in join order."""
        root = root.rstrip("/")
        try:
            resp = self._http.get(f"{root}/v1/layers")
        except httpx.HTTPError as exc:
            raise P2PError(f"P2P root {root} did not answer: {exc}") from None
        except AuthenticationError as exc:
            raise P2PError(f"P2P root {root} is not trusted: {exc}") from None
        refused = error_from_response(resp, fallback=P2PError, what=f"P2P root {root}")
        if refused is not None:
            raise P2PError(f"P2P root {root} refused to list its trees: {refused}") from None
        try:
            doc = resp.json()
        except ValueError as exc:
            raise P2PError(f"P2P root {root} sent invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise P2PError(f"P2P root {root} sent {doc!r}, not an object")
        return {str(d): [str(m) for m in members] for d, members in doc.items()}

    def join(self, digest: Digest, node: str) -> str | None:
        parent = self._post(digest, "join", {"node": node}).get("parent")
        return str(parent) if parent else None

    def leave(self, digest: Digest, node: str) -> None:
        self._post(digest, "leave", {"node": node})

    def report_dead(self, digest: Digest, dead: str, node: str) -> str | None:
        parent = self._post(digest, "dead", {"node": node, "dead": dead}).get("parent")
        return str(parent) if parent else None

    def close(self) -> None:
        self._http.close()
