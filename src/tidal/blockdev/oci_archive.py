"""Reading source images: an OCI image layout (directory or tar) or a ``docker save`` tarball.

What the builder needs from either is the same: the image config and, bottom first, each
layer's digest, diff id and a way to open its tar stream (decompressed). Formats:

* OCI image layout: ``oci-layout``, ``index.json`` -> manifest (or nested index) -> config and
  layer descriptors, blobs under ``blobs/<alg>/<hex>``; as a directory or a tar of one
  (``skopeo copy ... oci-archive:``).
* docker-archive: ``manifest.json`` = ``[{"Config": ..., "Layers": [...]}]`` (``docker save``,
  ``skopeo copy ... docker-archive:``).

Layer blobs may be gzip, zstd or uncompressed tars; the magic bytes decide.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from tidal.errors import ArchiveFormatError, NotFoundError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Opener = Callable[[], IO[bytes]]


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

    @contextlib.contextmanager
    def open_tar(self) -> Iterator[tarfile.TarFile]:
        """The layer as a streaming tar (decompressed); one pass."""
        with self.open_blob() as raw:
            stream = decompressed(raw)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tf:
                    yield tf
            except tarfile.TarError as exc:
                raise ArchiveFormatError(
                    f"layer {self.digest}: not a valid tar stream ({exc})"
                ) from exc


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

    def exists(self, rel: str) -> bool:
        if not self._is_tar:
            return (self.path / rel).is_file()
        return rel in self._members

    def size(self, rel: str) -> int:
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

    def read_json(self, rel: str) -> Any:
        with self.opener(rel)() as fh:
            try:
                return json.loads(fh.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ArchiveFormatError(f"{self.path}: {rel} is not valid JSON: {exc}") from exc


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
    if not hexpart or "/" in digest or ".." in digest:
        raise ArchiveFormatError(f"bad digest {digest!r} in image manifest")
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


def _pick_manifest(files: _Files, index: dict[str, Any]) -> dict[str, Any]:
    manifests = index.get("manifests") or []
    if not manifests:
        raise ArchiveFormatError(f"{files.path}: index.json lists no manifests")
    preferred = [
        m
        for m in manifests
        if (m.get("platform") or {}).get("os", "linux") == "linux"
        and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"
    ]
    desc = (preferred or manifests)[0]
    doc = files.read_json(_blob_rel(desc["digest"]))
    if doc.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
        return _pick_manifest(files, doc)
    return {**doc, "_digest": desc["digest"]}


def _oci(files: _Files) -> SourceImage:
    manifest = _pick_manifest(files, files.read_json("index.json"))
    try:
        config = files.read_json(_blob_rel(manifest["config"]["digest"]))
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layers = []
        for i, desc in enumerate(manifest["layers"]):
            rel = _blob_rel(desc["digest"])
            layers.append(
                SourceLayer(
                    digest=desc["digest"],
                    diff_id=diff_ids[i] if i < len(diff_ids) else None,
                    size_bytes=int(desc.get("size", files.size(rel))),
                    media_type=desc.get("mediaType", ""),
                    open_blob=files.opener(rel),
                )
            )
    except (KeyError, TypeError) as exc:
        raise ArchiveFormatError(f"{files.path}: malformed OCI manifest ({exc!r})") from exc
    return SourceImage(str(files.path), config, tuple(layers), manifest.get("_digest"))


def _docker(files: _Files) -> SourceImage:
    doc = files.read_json("manifest.json")
    try:
        entry = doc[0]
        config = files.read_json(entry["Config"])
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layers = []
        for i, rel in enumerate(entry["Layers"]):
            rel = rel.removeprefix("./")
            diff = diff_ids[i] if i < len(diff_ids) else None
            layers.append(
                SourceLayer(
                    digest=diff or f"docker-archive:{rel}",
                    diff_id=diff,
                    size_bytes=files.size(rel),
                    media_type="application/vnd.docker.image.rootfs.diff.tar",
                    open_blob=files.opener(rel),
                )
            )
    except (KeyError, TypeError, IndexError) as exc:
        raise ArchiveFormatError(
            f"{files.path}: malformed docker-archive manifest.json ({exc!r})"
        ) from exc
    return SourceImage(str(files.path), config, tuple(layers))
