"""The node-local image store: registry references -> pulled (metadata-only) Tidal images.

``tidal pull REF`` stores what ``tidal image pull REF DIR`` writes (``manifest.json`` and
``origin.json``; the layer data comes lazily when a container reads it) under the image's
manifest digest, and records the reference in an index. Layout::

    $TIDAL_DATA_ROOT/images/sha256/<hex>/   one pulled image per manifest digest
    $TIDAL_DATA_ROOT/images/refs.json       reference -> manifest digest (and when)
    $TIDAL_DATA_ROOT/images/lock            flock: index updates and removals
    $TIDAL_DATA_ROOT/images/tmp/            pulls in progress

Two pulls at once are safe: each writes a private directory under ``tmp/`` and renames it into
place (the loser of the race drops its copy and uses the winner's); the index is read,
changed and rewritten atomically under the lock. Removing an image drops the chunk-cache
entries of its layers that no other stored image has (layers are shared by digest, so two
images on one base share both the layers and their cached chunks).

Who uses an image (the engine's containers) is not this module's business: callers pass the
users in, so the store stays below the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import pull_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registries import (
    LOCAL_REGISTRY_NAME,
    LOCAL_SCHEME,
    Registry,
    connect,
    resolve_reference,
)
from tidal.blobs.settings import BlobSettings, load_blob_settings
from tidal.config import data_root
from tidal.errors import (
    ConfigError,
    ImageInUseError,
    ImageReferenceNotFoundError,
    ManifestNotFoundError,
)
from tidal.fsutil import write_text_atomic
from tidal.ids import Digest, parse_digest
from tidal.image.manifest import Image, LayerRecord
from tidal.node.references import check_pull_policy

INDEX_VERSION = 1
STALE_TMP_S = 3600.0
"""A pull writes only metadata (seconds); an older directory in ``tmp/`` is a crashed pull's."""


@dataclass(frozen=True)
class StoredImage:
    """One reference in the store and the pulled image it names."""

    reference: str
    manifest_digest: Digest
    path: Path
    layers: tuple[LayerRecord, ...]
    """The data layers (the trace layer, if any, is not counted)."""
    pulled_at: float
    blob_digests: tuple[Digest, ...] = ()
    """Every layer blob, the trace layer's too (what the chunk cache may hold of it)."""

    @property
    def stored_bytes(self) -> int:
        """Bytes of the layer blobs in the registry (what a full download would move)."""
        return sum(r.size_bytes for r in self.layers)


@dataclass(frozen=True)
class RemoveResult:
    image: StoredImage
    directory_removed: bool
    """False while another reference still names the same manifest."""
    cache_entries_removed: int
    cache_bytes_removed: int


class ImageStore:
    """References -> pulled images under ``root`` (default ``$TIDAL_DATA_ROOT/images``)."""

    def __init__(self, root: Path | None = None, settings: BlobSettings | None = None) -> None:
        self.root = root if root is not None else data_root() / "images"
        self.settings = settings or load_blob_settings()

    # --- paths, lock, index -------------------------------------------------------------------

    def image_dir(self, digest: Digest) -> Path:
        return self.root / "sha256" / parse_digest(digest).split(":", 1)[1]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read_index(self) -> dict[str, dict[str, object]]:
        path = self.root / "refs.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"image index {path} is not valid JSON ({exc}); restore or remove it"
            ) from exc
        refs = doc.get("refs", {}) if isinstance(doc, dict) else {}
        return {str(k): dict(v) for k, v in refs.items()}

    def _write_index(self, refs: dict[str, dict[str, object]]) -> None:
        doc = {"version": INDEX_VERSION, "refs": dict(sorted(refs.items()))}
        write_text_atomic(self.root / "refs.json", json.dumps(doc, indent=2) + "\n", fsync=True)

    def _stored(self, reference: str, entry: dict[str, object]) -> StoredImage:
        digest = parse_digest(str(entry["digest"]))
        path = self.image_dir(digest)
        manifest = Image.open(path).manifest
        return StoredImage(
            reference,
            digest,
            path,
            manifest.data_layers,
            float(str(entry.get("pulled_at", 0))),
            tuple(r.digest for r in manifest.layers),
        )

    def _cache(self, registry: str) -> ChunkCache | None:
        if registry == LOCAL_REGISTRY_NAME or registry.startswith(LOCAL_SCHEME):
            return None  # the embedded store's blobs are local already
        return self.settings.chunk_cache()

    # --- verbs --------------------------------------------------------------------------------

    def parse(self, text: str) -> ImageReference:
        return resolve_reference(text, self.settings)

    def pull(self, text: str) -> StoredImage:
        """Resolve ``text`` at its registry and store the image's metadata (no layer data).

        An image already stored under the same manifest digest is not fetched again.
        """
        ref = self.parse(text)
        client = connect(ref.registry, self.settings)
        try:
            try:
                digest = client.resolve_manifest(ref.repository, ref.reference).digest
            except ManifestNotFoundError as exc:
                raise ImageReferenceNotFoundError(
                    f"image {ref} is not in its registry ({exc}); check the name and tag, "
                    "or push it first"
                ) from None
            final = self.image_dir(digest)
            if not (final / "manifest.json").is_file():
                self._pull_into(final, ref.with_digest(digest), client)
        finally:
            client.close()
        with self._locked():
            refs = self._read_index()
            refs[str(ref)] = {"digest": digest, "pulled_at": time.time()}
            self._write_index(refs)
            return self._stored(str(ref), refs[str(ref)])

    def _pull_into(self, final: Path, ref: ImageReference, client: Registry) -> None:
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp(tmp_root)
        tmp = tmp_root / f"{final.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            pull_image(
                ref,
                tmp,
                client,
                cache=self._cache(ref.registry),
                settings=self.settings,
            )
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                # another pull of the same manifest got there first: use its copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _sweep_tmp(tmp_root: Path) -> None:
        cutoff = time.time() - STALE_TMP_S
        for entry in tmp_root.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)

    def get(self, text: str) -> StoredImage:
        """The stored image of a reference; never contacts a registry."""
        ref = self.parse(text)
        refs = self._read_index()
        entry = refs.get(str(ref))
        if (
            entry is None
            and ref.digest is not None
            and (self.image_dir(ref.digest) / "manifest.json").is_file()
        ):
            entry = {"digest": ref.digest, "pulled_at": 0.0}
        if entry is None:
            raise ImageReferenceNotFoundError(
                f"image {ref} is not on this node; pull it with `tidal pull {text}`"
            )
        return self._stored(str(ref), entry)

    def resolve(self, text: str, pull: str = "missing") -> StoredImage:
        """What ``tidal run REF --pull POLICY`` runs (see :data:`PULL_POLICIES`)."""
        check_pull_policy(pull)
        if pull == "always":
            return self.pull(text)
        try:
            return self.get(text)
        except ImageReferenceNotFoundError:
            if pull == "never":
                raise ImageReferenceNotFoundError(
                    f"image {self.parse(text)} is not on this node and --pull never forbids "
                    f"pulling it; run `tidal pull {text}` or use --pull missing"
                ) from None
        return self.pull(text)

    def list(self) -> list[StoredImage]:
        return [self._stored(k, v) for k, v in sorted(self._read_index().items())]

    def fetched_bytes(self, image: StoredImage) -> int:
        """Bytes of the image's layers in the node's chunk cache (fetched, still held)."""
        origin = json.loads((image.path / "origin.json").read_text())
        cache = self._cache(str(origin.get("registry", "")))
        if cache is None:
            return 0
        return sum(cache.blob_bytes(d) for d in image.blob_digests)

    def remove(self, text: str, *, users: Sequence[str] = (), force: bool = False) -> RemoveResult:
        """Forget a reference; its image and its layers' cached chunks go when no other
        reference (for the image) or stored image (for a layer) needs them.

        ``users``: the containers that use the image (the caller knows them); refused unless
        ``force`` (a running container keeps its mount; it cannot be started again from it).
        """
        image = self.get(text)
        if users and not force:
            raise ImageInUseError(
                f"image {image.reference} is used by container(s) {', '.join(users)}; "
                "remove them first, or use `tidal rmi --force`"
            )
        with self._locked():
            refs = self._read_index()
            if refs.pop(image.reference, None) is None and image.pulled_at:
                raise ImageReferenceNotFoundError(
                    f"image {image.reference} was removed meanwhile (another `tidal rmi`)"
                )
            self._write_index(refs)
            if any(parse_digest(str(v["digest"])) == image.manifest_digest for v in refs.values()):
                return RemoveResult(image, False, 0, 0)
            origin = json.loads((image.path / "origin.json").read_text())
            shutil.rmtree(image.path, ignore_errors=True)
            still_needed = {d for other in self.list() for d in other.blob_digests}
        cache = self._cache(str(origin.get("registry", "")))
        entries = nbytes = 0
        if cache is not None:
            entries, nbytes = cache.drop_blobs(
                d for d in image.blob_digests if d not in still_needed
            )
        return RemoveResult(image, True, entries, nbytes)
