"""Tidal images in a registry: push, pull (metadata only) and open lazily.

- :func:`push_image` uploads a local image's layer blobs (streamed, skipped if present), its OCI
  config and its OCI manifest (``tidal.image.oci.to_oci``), so any distribution registry stores
  it and skopeo can inspect and copy it.
- :func:`fetch_oci_image` downloads an ordinary OCI/docker image into an OCI layout, the input
  ``tidal image convert`` reads.
- :func:`pull_image` fetches only the manifest and config and writes ``manifest.json`` plus
  ``origin.json`` (where the blobs live) into a directory; with a cache it also warms each
  layer's ZFile tail (its extent index and chunk table).
- :class:`LazyImage` opens such a directory with every layer read through a
  :class:`~tidal.blobs.cached_source.CachedRangeSource`; it adds up their statistics and turns an
  access trace (device offsets) into the stored chunk ranges each layer blob must prefetch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tidal.blobs.cached_source import CachedRangeSource, Prefetch, SourceStats, lazy_source_factory
from tidal.blobs.chain import FallbackBlobSource
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.pulled import ORIGIN_FILE
from tidal.blobs.reference import ImageReference
from tidal.blobs.registries import LOCAL_SCHEME, Registry, connect
from tidal.blobs.registry_client import RegistryBlobStore, RegistryClient
from tidal.blobs.settings import BlobSettings, load_blob_settings
from tidal.blobs.source import BlobSource, ByteRange, copy_blob
from tidal.errors import BlobError, ConfigError, FormatError, ImageNotFoundError
from tidal.fsutil import write_text_atomic
from tidal.ids import Digest, parse_digest
from tidal.image.device import BlockDevice
from tidal.image.extents import ExtentMap

if TYPE_CHECKING:
    from tidal.blobs.peer import P2PNode
from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import LAYER_KIND_TRACE, Image, ImageManifest
from tidal.image.merged import resolve
from tidal.image.oci import OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE, from_oci, to_oci
from tidal.image.trace import Trace
from tidal.image.zfile import VERSION, VERSION_CRC_ONLY, zfile_tail_size
from tidal.units import SECTOR_BYTES

log = logging.getLogger("tidal.blobs.distribution")


@dataclass(frozen=True)
class PushResult:
    reference: ImageReference
    manifest_digest: Digest
    blobs_uploaded: int
    bytes_uploaded: int


@dataclass(frozen=True)
class Origin:
    """Where a pulled image's blobs live."""

    registry: str
    repository: str
    manifest_digest: Digest


def push_image(
    image_dir: str | os.PathLike[str], reference: ImageReference, client: Registry
) -> PushResult:
    """Upload a local Tidal image; blobs the registry has already are not sent again."""
    image = Image.open(image_dir)
    artifact = to_oci(image.manifest)
    local = LocalBlobStore(image_dir)
    remote = client.blob_store(reference.repository)
    uploaded = 0
    nbytes = 0
    for rec in image.manifest.layers:
        if copy_blob(local, remote, rec.digest):
            uploaded += 1
            nbytes += rec.size_bytes
    if not remote.has(artifact.config_digest):
        remote.put_bytes(artifact.config, artifact.config_digest)
        uploaded += 1
        nbytes += len(artifact.config)
    tag = reference.tag or reference.reference
    digest = client.put_manifest(reference.repository, tag, artifact.manifest)
    return PushResult(reference.with_digest(digest), digest, uploaded, nbytes)


def pull_image(
    reference: ImageReference,
    dest: str | os.PathLike[str],
    client: Registry,
    *,
    cache: ChunkCache | None = None,
    settings: BlobSettings | None = None,
    with_blobs: bool = False,
) -> ImageManifest:
    """Fetch an image's metadata into ``dest`` (no layer data); warm layer tails if cached.

    ``with_blobs`` downloads every layer blob too (streamed, digest-checked), making ``dest``
    an ordinary local image that works without the registry.
    """
    repo = reference.repository
    m = client.resolve_manifest(repo, reference.reference)
    doc = m.json()
    if m.media_type != OCI_MANIFEST_MEDIA_TYPE and doc.get("mediaType") != OCI_MANIFEST_MEDIA_TYPE:
        raise FormatError(
            f"{reference} is a {m.media_type}, not a Tidal image; convert it first with "
            "`tidal image convert`"
        )
    config = client.get_blob(repo, parse_digest(doc["config"]["digest"]))
    manifest = from_oci(m.body, config, name=str(reference))
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    origin = {"registry": client.registry, "repository": repo, "manifest_digest": m.digest}
    write_text_atomic(out / ORIGIN_FILE, json.dumps(origin, indent=2) + "\n")
    if with_blobs:
        remote = client.blob_store(repo)
        local = LocalBlobStore(out)
        for rec in manifest.layers:
            if isinstance(remote, RegistryBlobStore):
                remote.remember_size(rec.digest, rec.size_bytes)
            copy_blob(remote, local, rec.digest)
    write_text_atomic(out / "manifest.json", manifest.to_json())
    if cache is not None and not with_blobs:
        with LazyImage.open(out, client.blob_store(repo), cache, settings) as lazy:
            lazy.image.layers()  # reads each layer's footer and tail into the cache
    return manifest


def fetch_oci_image(
    reference: ImageReference,
    dest: str | os.PathLike[str],
    client: Registry,
    *,
    os_name: str = "linux",
    architecture: str = "amd64",
) -> Path:
    """Download an ordinary OCI/docker image into an OCI image layout directory at ``dest``.

    This is how ``tidal image convert`` reads its input straight from a registry: the layout
    is what ``skopeo copy docker://REF oci:DIR:TAG`` would write (one platform, manifest bytes
    unchanged so digests hold), and the converter already reads layouts. Blobs are streamed in
    ranges into ``dest/blobs/sha256`` and checked against their digests; present ones are kept.
    """
    repo = reference.repository
    m = client.resolve_manifest(
        repo, reference.reference, os_name=os_name, architecture=architecture
    )
    doc = m.json()
    try:
        digests = [parse_digest(doc["config"]["digest"])]
        digests += [parse_digest(layer["digest"]) for layer in doc.get("layers", [])]
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{reference}: manifest without config/layers ({exc!r})") from exc
    out = Path(dest)
    store = LocalBlobStore(out)
    remote = client.blob_store(repo)
    for digest in digests:
        copy_blob(remote, store, digest)
    store.put_bytes(m.body, m.digest)
    write_text_atomic(out / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    entry = {
        "mediaType": m.media_type,
        "digest": m.digest,
        "size": len(m.body),
        "annotations": {"org.opencontainers.image.ref.name": reference.tag or "latest"},
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": [entry]}
    write_text_atomic(out / "index.json", json.dumps(index, indent=2) + "\n")
    return out


def read_origin(image_dir: str | os.PathLike[str]) -> Origin:
    path = Path(image_dir) / ORIGIN_FILE
    try:
        doc = json.loads(path.read_text())
        return Origin(doc["registry"], doc["repository"], parse_digest(doc["manifest_digest"]))
    except FileNotFoundError:
        raise ImageNotFoundError(
            f"{image_dir} was not pulled from a registry (no {ORIGIN_FILE}); "
            "pull it with `tidal image pull REF DIR`"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"{path} is malformed: {exc!r}; pull the image again") from exc


def _p2p_node(settings: BlobSettings) -> P2PNode | None:
    """This node's P2P presence for one mount, when ``[blobs] p2p_roots`` names roots.

    The peer server (and its HTTP kit, prometheus-client) is imported only then: a lazy
    mount without P2P does not load it before it reports ready."""
    from tidal.blobs.peer import P2PNode
    from tidal.service.auth import token_from_settings

    if not settings.p2p_roots:
        return None
    token = token_from_settings(settings.p2p_token_file)
    if token is None:
        raise ConfigError(
            "[blobs] p2p_roots is set but p2p_token_file is not: P2P admits cluster members "
            "only (make a token with `tidal p2p token > FILE; chmod 600 FILE` on one node and "
            "give every node and root the same file)"
        )
    host, port = None, 0
    if settings.p2p_listen is not None:
        host_text, _, port_text = settings.p2p_listen.rpartition(":")
        if not port_text.isdigit():
            raise ConfigError(f"[blobs] p2p_listen {settings.p2p_listen!r}: expected host:port")
        host, port = host_text or None, int(port_text)
    return P2PNode(list(settings.p2p_roots), host, port, settings.p2p_advertise, token=token)


def open_pulled_image(
    image_dir: str | os.PathLike[str],
    *,
    settings: BlobSettings | None = None,
    prefetch: bool = True,
) -> LazyImage:
    """Everything a mount needs for a pulled image, from the ``[blobs]`` settings.

    The registry client (credentials from the auth file), the node's chunk cache, the lazy
    layer sources, and — if the image carries a trace and ``prefetch`` — the background replay
    of the trace. ``close()`` the result to stop prefetching and release connections. An image
    pulled from the embedded local store reads its blobs straight from there (no cache: they
    are local already).
    """
    settings = settings or load_blob_settings()
    origin = read_origin(image_dir)
    client = connect(origin.registry, settings)
    try:
        local = origin.registry.startswith(LOCAL_SCHEME)
        cache = None if local else settings.chunk_cache()
        p2p = _p2p_node(settings) if cache is not None else None
        try:
            lazy = LazyImage(
                Path(image_dir), client.blob_store(origin.repository), cache, settings, p2p
            )
            lazy.owned_client = client
            lazy.open_layers(prefetch=prefetch and cache is not None)
        except BaseException:
            if p2p is not None:
                p2p.close()
            raise
    except BaseException:
        client.close()
        raise
    return lazy


class LazyImageMetrics:
    """A Prometheus collector over a lazy image's counters, read at scrape time: bytes
    fetched, cache hits and misses, and with P2P the bytes received by source (peers or the
    registry). prometheus-client is imported when it first collects, not with the image."""

    def __init__(self, lazy: LazyImage, labels: dict[str, str]) -> None:
        self.lazy = lazy
        self.labels = labels

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        from tidal.service.server import counter_families

        names, values = list(self.labels), list(self.labels.values())
        total = self.lazy.stats
        yield from counter_families(
            self.labels,
            (
                (
                    "tidal_mount_fetched_bytes",
                    "Bytes fetched from remote sources",
                    total.bytes_fetched,
                ),
                ("tidal_mount_cache_hits", "Chunk reads answered by the chunk cache", total.hits),
                ("tidal_mount_cache_misses", "Chunk reads that had to fetch", total.misses),
            ),
        )
        if self.lazy.p2p is not None:
            received = CounterMetricFamily(
                "tidal_p2p_received_bytes",
                "Chunk bytes this mount received, by source (peer: its tree's parent)",
                labels=[*names, "source"],
            )
            chains = list(self.lazy.chains.values())
            from_peers = sum(c.bytes_by[c.sources[0].name] for c in chains)
            from_registry = sum(c.bytes_by[c.sources[-1].name] for c in chains)
            received.add_metric([*values, "peer"], from_peers)
            received.add_metric([*values, "registry"], from_registry)
            yield received


class LazyImage:
    """An image whose layer blobs come from a BlobSource through the chunk cache."""

    def __init__(
        self,
        path: Path,
        source: BlobSource,
        cache: ChunkCache | None,
        settings: BlobSettings | None = None,
        p2p: P2PNode | None = None,
    ) -> None:
        """With ``p2p``, each layer reads through its tree's parent before ``source``, and
        this node serves what it holds to its children."""
        self.source = source
        self.cache = cache
        self.settings = settings or BlobSettings()
        self.p2p = p2p
        self.sources: dict[Digest, CachedRangeSource] = p2p.sources if p2p else {}
        self.chains: dict[Digest, FallbackBlobSource] = {}
        self.owned_client: Registry | None = None
        """Closed with this image (set when the image made its own client)."""
        self.prefetches: list[Prefetch] = []
        """Background replays started by :meth:`prefetch_trace`."""
        self._trace: Trace | None = None
        self._trace_read = False

        def factory(digest: Digest, size_bytes: int) -> CachedRangeSource:
            if isinstance(source, RegistryBlobStore):
                source.remember_size(digest, size_bytes)  # the manifest says; no HEAD needed
            layer_source: BlobSource = source
            if p2p is not None:
                chain = FallbackBlobSource([p2p.link(digest), source])
                self.chains[digest] = chain
                layer_source = chain
            src = lazy_source_factory(layer_source, cache, self.settings, pinned, tail_size)(
                digest, size_bytes
            )
            self.sources[digest] = src
            return src

        def pinned(digest: Digest) -> str | None:
            for rec in self.image.manifest.layers:
                if rec.digest == digest:
                    return rec.index_sha256
            return None

        def tail_size(digest: Digest) -> int | None:
            """The layer's ZFile tail size from its record: one request opens the layer."""
            if not self.settings.tail_in_one_request:
                return None
            for rec in self.image.manifest.data_layers:
                if rec.digest == digest and rec.chunk_size_bytes > 0:
                    return zfile_tail_size(
                        rec.raw_data_bytes,
                        rec.chunk_size_bytes,
                        ExtentMap.serialized_size(rec.extent_count),
                        version=VERSION if rec.index_sha256 else VERSION_CRC_ONLY,
                    )
            return None

        self.image = Image.open(path, source_factory=factory)
        self._check_digest_policy()

    def _check_digest_policy(self) -> None:
        """Layers without chunk digests (built before them) are refused by ``[blobs]
        require_digests``, else read with a warning: their chunks are checked by crc32 only,
        which anyone between this node and the registry or a peer can forge."""
        old = [r for r in self.image.manifest.data_layers if r.index_sha256 is None]
        if not old:
            return
        what = (
            f"{self.image.path}: {len(old)} layer(s) carry no chunk digests (built by an older "
            "Tidal; crc32 only)"
        )
        if self.settings.require_digests:
            raise FormatError(
                f"{what}; refused by [blobs] require_digests: rebuild or re-convert the image"
            )
        log.warning("%s: their bytes are not authenticated; rebuild the image", what)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        source: BlobSource,
        cache: ChunkCache | None,
        settings: BlobSettings | None = None,
    ) -> LazyImage:
        return cls(Path(path), source, cache, settings)

    @classmethod
    def from_registry(
        cls,
        path: str | os.PathLike[str],
        client: RegistryClient,
        cache: ChunkCache | None,
        settings: BlobSettings | None = None,
    ) -> LazyImage:
        """Open a pulled image; its blobs come from the repository named in ``origin.json``."""
        origin = read_origin(path)
        return cls(Path(path), RegistryBlobStore(client, origin.repository), cache, settings)

    @property
    def stats(self) -> SourceStats:
        """The sum over all layer sources: bytes fetched, hits, misses, prefetched chunks."""
        parts = [s.stats for s in self.sources.values()]
        return SourceStats(
            *(sum(getattr(p, f) for p in parts) for f in SourceStats.__dataclass_fields__)
        )

    def stats_doc(self) -> dict[str, object]:
        """Everything ``tidal image stats`` shows, as JSON-ready data."""
        doc: dict[str, object] = {
            "image": str(self.image.path),
            "source": self.source.name,
            "layers": {d: asdict(src.stats) for d, src in self.sources.items()},
            "total": asdict(self.stats),
            "prefetch": {
                "running": sum(not p.done for p in self.prefetches),
                "groups": sum(p.groups_total for p in self.prefetches),
                "skipped_chunks": sum(p.skipped_chunks for p in self.prefetches),
                "errors": sum(len(p.errors) for p in self.prefetches),
            },
        }
        if self.cache is not None:
            doc["cache"] = {**asdict(self.cache.stats), "dir": str(self.cache.root)}
        if self.p2p is not None:
            from_peers = sum(c.bytes_by[c.sources[0].name] for c in self.chains.values())
            from_registry = sum(c.bytes_by[c.sources[-1].name] for c in self.chains.values())
            doc["p2p"] = {
                **self.p2p.stats_doc(),
                "bytes_from_peers": from_peers,
                "bytes_from_registry": from_registry,
            }
        return doc

    def write_stats(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`stats_doc` atomically, for a process other than the FUSE server to read."""
        write_text_atomic(Path(path), json.dumps(self.stats_doc(), indent=2) + "\n")

    def trace(self) -> Trace | None:
        """The image's access trace, if a trace layer was pushed with it (read once: the
        replay and the page-cache warmer both ask)."""
        if not self._trace_read:
            self._trace = self._read_trace()
            self._trace_read = True
        return self._trace

    def _read_trace(self) -> Trace | None:
        for rec in self.image.manifest.layers:
            if rec.kind == LAYER_KIND_TRACE:
                # kept in the pulled image after the first mount: a warm start asks no registry
                local = LocalBlobStore(self.image.path)
                if local.has(rec.digest):
                    data = local.read(rec.digest, 0, local.size(rec.digest))
                else:
                    data = self.source.read(rec.digest, 0, rec.size_bytes)  # digest-checked
                    with contextlib.suppress(OSError, BlobError):
                        local.put_bytes(data, rec.digest)
                return Trace.deserialize(data, name=f"trace layer of {self.image.path}")
        return None

    def open_layers(self, *, prefetch: bool = True) -> None:
        """Open every layer (its tail: what a mount needs before it can serve a read) and, with
        ``prefetch``, start replaying the image's trace. The trace blob is fetched while the
        layers open, not after them: one round trip fewer before the mount is ready."""
        if not prefetch or not any(r.kind == LAYER_KIND_TRACE for r in self.image.manifest.layers):
            self.image.layers()
            return
        with ThreadPoolExecutor(1, thread_name_prefix="tidal-trace") as pool:
            pending = pool.submit(self.trace)
            self.image.layers()
            trace = pending.result()
        if trace is not None:
            self.prefetch_trace(trace)

    def plan_prefetch(self, trace: Trace) -> dict[Digest, list[ByteRange]]:
        """The stored chunk ranges, per layer blob, that the trace's device ranges read.

        In trace order (the order the container needed them), each chunk once.
        """
        return self._plan((tr.lba_sectors, tr.length_sectors) for tr in trace.ranges)

    def plan_read(self, offset: int, length: int) -> dict[Digest, list[ByteRange]]:
        """The stored chunk ranges, per layer blob, that a device read of these bytes needs."""
        if length <= 0:
            return {}
        lba = offset // SECTOR_BYTES
        end = -(-(offset + length) // SECTOR_BYTES)
        return self._plan([(lba, end - lba)])

    def _plan(self, sector_ranges: Iterable[tuple[int, int]]) -> dict[Digest, list[ByteRange]]:
        layers = self.image.layers()
        records = self.image.manifest.data_layers
        digest_of = {id(layer): rec.digest for layer, rec in zip(layers, records, strict=True)}
        plan: dict[Digest, list[ByteRange]] = {}
        seen: set[tuple[Digest, ByteRange]] = set()
        for lba, count in sector_ranges:
            for seg, layer in resolve(layers, lba, count):
                ext = seg.extent
                if layer is None or ext is None or ext.zeroed:
                    continue
                digest = digest_of[id(layer)]
                zfile = cast(ReadOnlyLayer, layer).zfile
                spans = zfile.chunk_spans(
                    ext.data_offset_sectors * SECTOR_BYTES, ext.length_sectors * SECTOR_BYTES
                )
                for span in spans:
                    r = ByteRange.of(span.stored_offset, span.stored_size)
                    if (digest, r) not in seen:
                        seen.add((digest, r))
                        plan.setdefault(digest, []).append(r)
        return plan

    def device(self, writable_dir: str | os.PathLike[str] | None = None) -> BatchingView:
        """The block device to serve, with batched chunk fetches: the merged view, or a
        writable layer in ``writable_dir`` over it."""
        if writable_dir is None:
            return BatchingView(self)
        return BatchingView(self, self.image.writable(writable_dir))

    def prefetch_trace(
        self, trace: Trace | None = None, concurrency: int | None = None
    ) -> Sequence[Prefetch]:
        """Start replaying ``trace`` (default: the image's own) in the background."""
        trace = trace if trace is not None else self.trace()
        if trace is None:
            return []
        plan = self.plan_prefetch(trace)
        total = concurrency or self.settings.prefetch_concurrency
        chunks = sum(len(r) for r in plan.values()) or 1
        # The layers share one connection pool: split the requests in flight between them
        # in proportion to their work, so the whole replay keeps ``total`` requests in flight.
        started = [
            self.sources[d].prefetch(ranges, max(1, round(total * len(ranges) / chunks)))
            for d, ranges in plan.items()
        ]
        self.prefetches.extend(started)
        return started

    def close(self) -> None:
        if self.p2p is not None:
            self.p2p.close()  # leave the trees before the sources go
        for src in self.sources.values():
            src.close()
        if self.owned_client is not None:
            self.owned_client.close()
            self.owned_client = None

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchingView:
    """A lazy image's device (merged view or writable layer), fetching a read's chunks in one go.

    The format decompresses a read's chunks one after another, so on a cold cache a 128 KiB
    read through the block device would wait for two or three round trips in a row. This view
    first works out the chunks (:meth:`LazyImage.plan_read`), fetches the missing ones with
    coalesced, concurrent requests, then lets the inner device read them from the cache. Over
    a writable layer the plan may name a chunk whose sectors the layer has overwritten: one
    wasted fetch at most, since the chunk then stays cached.
    """

    def __init__(self, lazy: LazyImage, inner: BlockDevice | None = None) -> None:
        self._lazy = lazy
        self.inner: BlockDevice = inner if inner is not None else lazy.image.merged_view()
        self.batched_reads = 0

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    @property
    def size_bytes(self) -> int:
        return self.inner.size_bytes

    def read(self, offset: int, length: int) -> bytes:
        batch = self._lazy.cache is not None  # without a cache the fetched bytes would be lost
        if batch and offset >= 0 and length > 0 and offset + length <= self.inner.size_bytes:
            plan = self._lazy.plan_read(offset, length)
            missing = {
                d: [r for r in ranges if not self._lazy.sources[d].is_cached(r)]
                for d, ranges in plan.items()
            }
            if sum(len(v) for v in missing.values()) > 1:
                self.batched_reads += 1
                for digest, ranges in missing.items():
                    if ranges:
                        self._lazy.sources[digest].fetch_ranges(ranges)
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.inner.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        """Flush and close a writable layer; a read-only view holds nothing to close."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            self.inner.flush()
            close()
