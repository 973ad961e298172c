"""Where images are pushed to and pulled from: an OCI registry, or the node's own directory.

The issue of "which registry" is decided once, here, from the reference the user typed:

- a reference naming a registry host (``127.0.0.1:5000/app:v1``, ``reg.example/app``) goes to
  that registry (:class:`~tidal.blobs.registry_client.RegistryClient`);
- a bare one (``app:v1``) goes to ``[blobs] default_registry`` if one is configured, else to the
  embedded default: :class:`LocalRegistry`, a directory that stores manifests and blobs the
  way a registry does, so push, pull and lazy mounts work on a node with no registry at all.

Both satisfy :class:`Registry`, the handful of calls distribution needs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.reference import ImageReference, names_registry
from tidal.blobs.registry_client import INDEX_MEDIA_TYPES, ManifestResponse, RegistryClient
from tidal.blobs.settings import BlobSettings, load_blob_settings
from tidal.blobs.source import BlobStore
from tidal.errors import BlobIntegrityError, ManifestNotFoundError, RegistryError
from tidal.fsutil import write_json_atomic
from tidal.ids import Digest, parse_digest, sha256_digest, short_digest
from tidal.image.oci import OCI_MANIFEST_MEDIA_TYPE

LOCAL_SCHEME = "local:"
"""``origin.json`` names the embedded store as ``local:<directory>``."""
LOCAL_REGISTRY_NAME = "local"
"""The registry part of a reference that lives in the embedded store."""


class Registry(Protocol):
    """The calls push, pull and lazy reads make; a real registry and the local store answer."""

    @property
    def registry(self) -> str:
        """How ``origin.json`` names it, so a later mount can reconnect."""

    def blob_store(self, repo: str) -> BlobStore: ...

    def put_manifest(
        self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST_MEDIA_TYPE
    ) -> Digest: ...

    def resolve_manifest(
        self, repo: str, reference: str, *, os_name: str = "linux", architecture: str = "amd64"
    ) -> ManifestResponse: ...

    def get_blob(self, repo: str, digest: Digest) -> bytes: ...

    def close(self) -> None: ...


_TAG_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class LocalRegistry:
    """The embedded default: ``ROOT/blobs/sha256/<hex>`` plus ``ROOT/repositories/REPO/tags/TAG``.

    Blobs (layers, configs and manifests alike) are content-addressed and shared by all
    repositories; a tag file holds ``{"digest", "mediaType"}`` and is replaced atomically.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = LocalBlobStore(self.root)

    @property
    def registry(self) -> str:
        return f"{LOCAL_SCHEME}{self.root}"

    def blob_store(self, repo: str) -> LocalBlobStore:
        return self._blobs

    def _tag_path(self, repo: str, tag: str) -> Path:
        if not _TAG_FILE_RE.match(tag):
            raise RegistryError(f"{tag!r} is not a valid tag")
        return self.root / "repositories" / repo / "tags" / tag

    def put_manifest(
        self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST_MEDIA_TYPE
    ) -> Digest:
        digest = self._blobs.put_bytes(body)
        if not reference.startswith("sha256:"):
            path = self._tag_path(repo, reference)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"digest": digest, "mediaType": media_type})
        return digest

    def resolve_manifest(
        self, repo: str, reference: str, *, os_name: str = "linux", architecture: str = "amd64"
    ) -> ManifestResponse:
        if reference.startswith("sha256:"):
            digest = parse_digest(reference)
        else:
            path = self._tag_path(repo, reference)
            try:
                doc = json.loads(path.read_text())
                digest = parse_digest(doc["digest"])
            except FileNotFoundError:
                raise ManifestNotFoundError(
                    f"no image {repo}:{reference} in the local store {self.root}; push it with "
                    "`tidal image push IMAGE REF`"
                ) from None
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RegistryError(f"tag file {path} is malformed ({exc!r})") from exc
        if not self._blobs.has(digest):
            raise ManifestNotFoundError(
                f"manifest {short_digest(digest)} of {repo} is not in the local store {self.root}"
            )
        body = self._blobs.read(digest, 0, self._blobs.size(digest))
        if sha256_digest(body) != digest:
            raise BlobIntegrityError(f"manifest {short_digest(digest)} in {self.root} is corrupt")
        doc_any: Any = json.loads(body)
        media_type = str(doc_any.get("mediaType") or OCI_MANIFEST_MEDIA_TYPE)
        if media_type in INDEX_MEDIA_TYPES:
            raise RegistryError(f"{repo}:{reference} in {self.root} is an index, not an image")
        return ManifestResponse(media_type, digest, body)

    def get_blob(self, repo: str, digest: Digest) -> bytes:
        return self._blobs.read(digest, 0, self._blobs.size(digest))

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_reference(text: str, settings: BlobSettings | None = None) -> ImageReference:
    """Parse what the user typed, filling in the configured default registry (or the local store)."""
    settings = settings or load_blob_settings()
    if names_registry(text):
        return ImageReference.parse(text)
    default = settings.default_registry or LOCAL_REGISTRY_NAME
    return ImageReference.parse(text, default_registry=default)


def connect(registry: str, settings: BlobSettings | None = None) -> Registry:
    """A client for a registry named in a reference or an ``origin.json``."""
    settings = settings or load_blob_settings()
    if registry == LOCAL_REGISTRY_NAME:
        return LocalRegistry(settings.resolved_store_dir())
    if registry.startswith(LOCAL_SCHEME):
        return LocalRegistry(registry.removeprefix(LOCAL_SCHEME))
    return RegistryClient(registry, settings=settings)
