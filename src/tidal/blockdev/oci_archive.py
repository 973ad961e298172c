"""Reading source images: an OCI image layout (directory or tar) or a ``docker save`` tarball.

What the builder needs from either is the same: the image config and, bottom first, each
layer's digest, diff id and a way to open its tar stream (decompressed). Formats:

* OCI image layout: ``oci-layout``, ``index.json`` -> manifest (or nested index) -> config and
  layer descriptors, blobs under ``blobs/<alg>/<hex>``; as a directory or a tar of one
  (``skopeo copy ... oci-archive:``).
* docker-archive: ``manifest.json`` = ``[{"Config": ..., "Layers": [...]}]`` (``docker save``,
  ``skopeo copy ... docker-archive:``).

Layer blobs may be gzip, zstd or uncompressed tars; the magic bytes decide.

Nothing is taken on trust: every document is decoded into a typed shape (msgspec; unknown
fields are ignored, as the image spec requires of readers), every blob read is checked
against its descriptor's digest and size, and each layer's uncompressed stream against the
config's ``rootfs.diff_ids`` entry, before the conversion counts it as done. A mismatch is
one :class:`~tidal.errors.ArchiveFormatError` line naming the blob.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

import msgspec
import zstandard

from tidal.errors import ArchiveFormatError, NotFoundError, UnsafeArchiveError
from tidal.fsutil import HashingReader

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Opener = Callable[[], IO[bytes]]
T = TypeVar("T")

MAX_INDEX_DEPTH = 8
"""Nested indexes followed before giving up (a self-referencing index would loop forever)."""
MAX_DOCUMENT_BYTES = 4 << 20
"""Largest index, manifest or config read (the distribution spec's manifest limit is 4 MiB)."""
MAX_PATH_BYTES = 4096
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


# --- the documents, as typed shapes -----------------------------------------------------------


class _Platform(msgspec.Struct):
    os: str = "linux"
    architecture: str = "amd64"


class _Descriptor(msgspec.Struct, rename="camel"):
    digest: str
    size: int
    media_type: str = ""
    platform: _Platform | None = None


class _Index(msgspec.Struct, rename="camel"):
    manifests: list[_Descriptor]
    media_type: str = ""


class _Manifest(msgspec.Struct, rename="camel"):
    config: _Descriptor
    layers: list[_Descriptor]
    media_type: str = ""


class _RootFs(msgspec.Struct):
    diff_ids: list[str] = msgspec.field(default_factory=list)


class _Config(msgspec.Struct):
    rootfs: _RootFs = msgspec.field(default_factory=_RootFs)


class _DockerEntry(msgspec.Struct, rename="pascal"):
    config: str
    layers: list[str]


def _decode(data: bytes, shape: type[T], where: str) -> T:
    try:
        return msgspec.json.decode(data, type=shape)
    except msgspec.ValidationError as exc:
        raise ArchiveFormatError(f"{where} is malformed ({exc})") from None
    except msgspec.DecodeError as exc:
        raise ArchiveFormatError(f"{where} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ArchiveFormatError(f"{where} is JSON nested too deeply") from None


def _digest(text: str, where: str) -> str:
    if not _DIGEST_RE.match(text):
        raise ArchiveFormatError(
            f"{where}: bad digest {text[:80]!r} (expected sha256:<64 hex> or sha512:<128 hex>)"
        )
    return text


def _check_bytes(data: bytes, digest: str, size: int, where: str) -> None:
    algo, _, want = digest.partition(":")
    if len(data) != size:
        raise ArchiveFormatError(f"{where}: {len(data)} bytes, its descriptor says {size}")
    if hashlib.new(algo, data).hexdigest() != want:
        raise ArchiveFormatError(f"{where}: content does not match its digest {digest}")


@dataclass(frozen=True)
class SourceLayer:
    """One layer of the source image."""

    digest: str
    """Digest of the blob as stored (compressed, for OCI layouts)."""
    diff_id: str | None
    """Digest of the uncompressed tar, from the config's ``rootfs.diff_ids``."""
    size_bytes: int
    media_type: str
    open_blob: Opener
    verify_blob: bool = True
    """Check the stored blob against :attr:`digest` and :attr:`size_bytes` (a docker-archive
    names its layers by path, so only the diff id can be checked there)."""

    @contextlib.contextmanager
    def open_tar(self) -> Iterator[tarfile.TarFile]:
        """The layer as a streaming tar (decompressed); one pass.

        When the caller's block ends normally, the rest of the stream is read and the blob's
        digest and size and the uncompressed stream's diff id are checked; a mismatch raises
        :class:`ArchiveFormatError` (so nothing built from a forged layer is kept).
        """
        with self.open_blob() as raw_fh:
            raw = HashingReader(
                raw_fh, self.digest.partition(":")[0] if self.verify_blob else "sha256"
            )
            plain_fh = decompressed(io.BufferedReader(raw, 1 << 20))
            plain = HashingReader(plain_fh, (self.diff_id or "sha256:").partition(":")[0])
            try:
                with tarfile.open(fileobj=plain, mode="r|") as tf:
                    yield tf
                plain.drain()
                raw.drain()
            except tarfile.TarError as exc:
                raise ArchiveFormatError(
                    f"layer {self.digest}: not a valid tar stream ({exc})"
                ) from exc
            except (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as exc:
                raise ArchiveFormatError(
                    f"layer {self.digest}: truncated or corrupt compressed stream ({exc})"
                ) from exc
        if self.verify_blob:
            if raw.size_bytes != self.size_bytes:
                raise ArchiveFormatError(
                    f"layer {self.digest}: blob is {raw.size_bytes} bytes, its descriptor says "
                    f"{self.size_bytes}"
                )
            if raw.digest != self.digest:
                raise ArchiveFormatError(
                    f"layer {self.digest}: blob content does not match its digest"
                )
        if self.diff_id is not None and plain.digest != self.diff_id:
            raise ArchiveFormatError(
                f"layer {self.digest}: uncompressed content does not match rootfs.diff_ids "
                f"entry {self.diff_id}"
            )


@dataclass(frozen=True)
class SourceImage:
    """A parsed source image: its OCI config document and layers, bottom first."""

    name: str
    config: dict[str, Any]
    layers: tuple[SourceLayer, ...]
    manifest_digest: str | None = None


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` decompressed according to its magic bytes (gzip, zstd, or as is)."""
    buffered: Any = raw if hasattr(raw, "peek") else io.BufferedReader(raw, 1 << 20)  # type: ignore[type-var]
    head = buffered.peek(4)[:4]
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[return-value]
    return buffered  # type: ignore[no-any-return]


class _Files:
    """Uniform access to a directory or a tar archive by relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._is_tar = False
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            self._is_tar = True
            try:
                with tarfile.open(path, mode="r:") as tf:
                    for m in tf.getmembers():
                        self._members[m.name.removeprefix("./").lstrip("/")] = m
            except tarfile.TarError as exc:
                raise ArchiveFormatError(
                    f"{path} is neither an OCI layout directory nor an uncompressed tar "
                    f"(oci-archive or docker-archive): {exc}"
                ) from exc
        elif not path.is_dir():
            raise NotFoundError(f"source image {path} does not exist")

    def safe(self, rel: str) -> str:
        """``rel`` if it names a file inside the image (no ``..``, not absolute, not huge)."""
        parts = PurePosixPath(rel).parts
        if (
            not rel
            or len(rel.encode()) > MAX_PATH_BYTES
            or "\x00" in rel
            or rel.startswith("/")
            or ".." in parts
            or any(len(part.encode()) > 255 for part in parts)
        ):
            raise UnsafeArchiveError(
                f"{self.path}: path {rel[:80]!r}{'...' if len(rel) > 80 else ''} points outside "
                "the image or is not a valid path"
            )
        return rel

    def exists(self, rel: str) -> bool:
        rel = self.safe(rel)
        if not self._is_tar:
            return (self.path / rel).is_file()
        return rel in self._members

    def size(self, rel: str) -> int:
        if not self.exists(rel):
            raise ArchiveFormatError(f"{self.path}: {rel} is referenced but missing")
        if not self._is_tar:
            return (self.path / rel).stat().st_size
        return self._members[rel].size

    def opener(self, rel: str) -> Opener:
        if not self.exists(rel):
            raise ArchiveFormatError(f"{self.path}: {rel} is referenced but missing")
        if not self._is_tar:
            full = self.path / rel
            return lambda: full.open("rb")
        tar_path, member = self.path, self._members[rel]

        def open_member() -> IO[bytes]:
            tf = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 - closed by _Closing
            f = tf.extractfile(member)
            if f is None:
                tf.close()
                raise ArchiveFormatError(f"{tar_path}: {rel} is not a regular file")
            return io.BufferedReader(_Closing(f, tf), 1 << 20)

        return open_member

    def read_document(self, rel: str) -> bytes:
        """A small JSON document's bytes (refused above :data:`MAX_DOCUMENT_BYTES`)."""
        if self.size(rel) > MAX_DOCUMENT_BYTES:
            raise ArchiveFormatError(
                f"{self.path}: {rel} is larger than {MAX_DOCUMENT_BYTES} bytes; not a document"
            )
        with self.opener(rel)() as fh:
            return bytes(fh.read(MAX_DOCUMENT_BYTES + 1))

    def read_blob(self, desc: _Descriptor, what: str) -> bytes:
        """A document blob named by ``desc``, checked against its digest and size."""
        digest = _digest(desc.digest, f"{self.path}: {what}")
        rel = _blob_rel(digest)
        where = f"{self.path}: {what} {digest}"
        if not self.exists(rel):
            raise ArchiveFormatError(f"{where} is referenced but missing")
        data = self.read_document(rel)
        _check_bytes(data, digest, desc.size, where)
        return data


class _Closing(io.RawIOBase):
    """A member stream that also closes its tar file."""

    def __init__(self, f: IO[bytes], owner: tarfile.TarFile) -> None:
        self._f, self._owner = f, owner

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self._owner.close()
        super().close()


def _blob_rel(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def open_source_image(path: str | os.PathLike[str]) -> SourceImage:
    """Parse an OCI layout (dir or tar) or a docker-archive at ``path``."""
    p = Path(path)
    files = _Files(p)
    if files.exists("index.json"):
        return _oci(files)
    if files.exists("manifest.json"):
        return _docker(files)
    raise ArchiveFormatError(
        f"{p} has neither index.json (OCI image layout) nor manifest.json (docker-archive); "
        "make one with `skopeo copy docker://IMAGE oci-archive:FILE` or `docker save`"
    )


class _Kind(msgspec.Struct, rename="camel"):
    """Enough of a document to tell an index from a manifest."""

    media_type: str = ""
    manifests: Any = None


def _is_index(data: bytes, where: str) -> bool:
    kind = _decode(data, _Kind, where)
    return kind.media_type in (OCI_INDEX, DOCKER_LIST) or kind.manifests is not None


def _pick_manifest(
    files: _Files, index: _Index, where: str, depth: int = 0
) -> tuple[_Manifest, str]:
    """The linux/amd64 manifest (or the first) of ``index``, following nested indexes."""
    if depth >= MAX_INDEX_DEPTH:
        raise ArchiveFormatError(
            f"{files.path}: indexes nested more than {MAX_INDEX_DEPTH} deep (a loop?)"
        )
    if not index.manifests:
        raise ArchiveFormatError(f"{where} lists no manifests")
    preferred = [
        m
        for m in index.manifests
        if (m.platform or _Platform()).os == "linux"
        and (m.platform or _Platform()).architecture == "amd64"
    ]
    desc = (preferred or index.manifests)[0]
    data = files.read_blob(desc, "manifest")
    inner = f"{files.path}: manifest {desc.digest}"
    if _is_index(data, inner):
        return _pick_manifest(files, _decode(data, _Index, inner), inner, depth + 1)
    return _decode(data, _Manifest, inner), desc.digest


def _oci(files: _Files) -> SourceImage:
    where = f"{files.path}: index.json"
    index = _decode(files.read_document("index.json"), _Index, where)
    manifest, manifest_digest = _pick_manifest(files, index, where)
    config_bytes = files.read_blob(manifest.config, "config")
    where_cfg = f"{files.path}: config {manifest.config.digest}"
    diff_ids = _decode(config_bytes, _Config, where_cfg).rootfs.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise ArchiveFormatError(
            f"{where_cfg}: rootfs.diff_ids lists {len(diff_ids)} layers, the manifest "
            f"{len(manifest.layers)}"
        )
    layers = []
    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
        digest = _digest(desc.digest, f"{files.path}: layer")
        rel = _blob_rel(digest)
        files.size(rel)  # missing blob: one line now, not at conversion time
        layers.append(
            SourceLayer(
                digest=digest,
                diff_id=_digest(diff_id, where_cfg + ": rootfs.diff_ids"),
                size_bytes=desc.size,
                media_type=desc.media_type,
                open_blob=files.opener(rel),
            )
        )
    config = msgspec.json.decode(config_bytes)
    return SourceImage(str(files.path), config, tuple(layers), manifest_digest)


def _docker(files: _Files) -> SourceImage:
    where = f"{files.path}: manifest.json"
    entries = _decode(files.read_document("manifest.json"), list[_DockerEntry], where)
    if not entries:
        raise ArchiveFormatError(f"{where} lists no images")
    entry = entries[0]
    cfg_rel = files.safe(entry.config.removeprefix("./"))
    config_bytes = files.read_document(cfg_rel)
    where_cfg = f"{files.path}: {cfg_rel}"
    diff_ids = _decode(config_bytes, _Config, where_cfg).rootfs.diff_ids
    if len(diff_ids) != len(entry.layers):
        raise ArchiveFormatError(
            f"{where_cfg}: rootfs.diff_ids lists {len(diff_ids)} layers, manifest.json "
            f"{len(entry.layers)}"
        )
    layers = []
    for rel_text, diff_id in zip(entry.layers, diff_ids, strict=True):
        rel = files.safe(rel_text.removeprefix("./"))
        diff = _digest(diff_id, where_cfg + ": rootfs.diff_ids")
        layers.append(
            SourceLayer(
                digest=diff,
                diff_id=diff,
                size_bytes=files.size(rel),
                media_type="application/vnd.docker.image.rootfs.diff.tar",
                open_blob=files.opener(rel),
                verify_blob=False,
            )
        )
    config = msgspec.json.decode(config_bytes)
    return SourceImage(str(files.path), config, tuple(layers))
