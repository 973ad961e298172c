"""Local images: a directory with ``manifest.json`` and one blob per block layer.

Layout::

    IMAGE/manifest.json          this module's ImageManifest, as JSON
    IMAGE/blobs/sha256/<hex>     one ZFile layer blob per block layer (and a trace blob, if any)

Where a layer's bytes come from is pluggable: :meth:`Image.open` takes a ``source_factory``
(digest, size) -> RandomAccessSource; the default reads the local blob file. A registry-backed
factory gives a lazy image without any change here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tidal.errors import ChecksumError, FormatError, ImageNotFoundError
from tidal.fsutil import write_by_digest, write_text_atomic
from tidal.ids import Digest, parse_digest, short_digest
from tidal.image.layer import ReadOnlyLayer
from tidal.image.merged import MergedView
from tidal.image.source import FileSource, RandomAccessSource
from tidal.image.writable import CommitInfo, WritableLayer
from tidal.image.zfile import DEFAULT_CHUNK_SIZE_BYTES, Codec

MANIFEST_FORMAT = "tidal.image.v1"
LAYER_KIND_DATA = "data"
LAYER_KIND_TRACE = "trace"
LAYER_KINDS = (LAYER_KIND_DATA, LAYER_KIND_TRACE)
"""The layer kinds this Tidal reads; any other is refused (a reader that skipped an unknown
kind would show a different file system than the publisher built)."""

SourceFactory = Callable[[Digest, int], RandomAccessSource]

EXACT_ROOT_ANNOTATION = "io.tidal.build.exact-root"
"""Set (``"true"``) by builders whose root holds exactly the image's tree: no ``/lost+found``
left by mkfs. Images without it (built before) have one, which the engine hides."""


@dataclass(frozen=True)
class LayerRecord:
    """One block layer of an image."""

    digest: Digest
    size_bytes: int
    """Size of the stored blob."""
    raw_data_bytes: int
    """Uncompressed size of the layer's packed sector data."""
    extent_count: int
    codec: str
    chunk_size_bytes: int
    tail_crc32: int
    """Checksum of the blob's metadata+chunk table, so a pulled tail can be checked."""
    kind: str = LAYER_KIND_DATA
    source_digest: str | None = None
    """The OCI layer (compressed tar) this block layer was converted from, if any."""
    source_diff_id: str | None = None
    index_sha256: str | None = None
    """sha256 of the blob's chunk table, metadata and footer (ZFile version 2): pins every
    chunk's sha256 to this manifest. None: an older layer, checked by crc32 only."""

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise FormatError(
                f"layer {self.digest}: unknown kind {self.kind!r}; this Tidal reads "
                f"{', '.join(LAYER_KINDS)} (an image from a newer Tidal?)"
            )


@dataclass(frozen=True)
class ImageManifest:
    """What makes an image: the virtual device size, its filesystem, and the layer stack."""

    size_bytes: int
    layers: tuple[LayerRecord, ...]
    fs_type: str = "ext4"
    format: str = MANIFEST_FORMAT
    config: dict[str, Any] = field(default_factory=dict)
    """The OCI image config's ``config`` section (Entrypoint, Cmd, Env, WorkingDir, ...)."""
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def data_layers(self) -> tuple[LayerRecord, ...]:
        return tuple(r for r in self.layers if r.kind == LAYER_KIND_DATA)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["layers"] = [asdict(r) for r in self.layers]
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, name: str = "manifest.json") -> ImageManifest:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise FormatError(f"expected a JSON object, got {type(doc).__name__}")
            if doc.get("format") != MANIFEST_FORMAT:
                raise FormatError(
                    f"format {doc.get('format')!r} is not {MANIFEST_FORMAT!r} (not a Tidal image, "
                    "or a newer one)"
                )
            layers = tuple(
                LayerRecord(**{**r, "digest": parse_digest(r["digest"])})
                for r in doc.get("layers", [])
            )

            return cls(
                size_bytes=int(doc["size_bytes"]),
                layers=layers,
                fs_type=doc.get("fs_type", "ext4"),
                format=doc["format"],
                config=dict(doc.get("config", {})),
                annotations=dict(doc.get("annotations", {})),
            )
        except json.JSONDecodeError as exc:
            raise FormatError(f"{name}: not valid JSON: {exc}") from exc
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None
        except RecursionError:
            raise FormatError(f"{name}: JSON nested too deeply") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"{name}: malformed manifest: {exc!r}") from exc


def blob_path(image_dir: Path, digest: Digest) -> Path:
    return image_dir / "blobs" / "sha256" / digest.split(":", 1)[1]


def sha256_file(path: Path) -> Digest:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return Digest("sha256:" + h.hexdigest())


class Image:
    """An image on disk (or one whose blobs come from elsewhere through ``source_factory``)."""

    def __init__(
        self, path: Path, manifest: ImageManifest, source_factory: SourceFactory | None = None
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._factory = source_factory or self._local_source
        self._layers: list[ReadOnlyLayer] | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], source_factory: SourceFactory | None = None
    ) -> Image:
        p = Path(path)
        mf = p / "manifest.json"
        try:
            text = mf.read_bytes().decode()
        except UnicodeDecodeError as exc:
            raise FormatError(f"{mf}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except FileNotFoundError:
            raise ImageNotFoundError(
                f"{p} is not a Tidal image (no manifest.json); build one with `tidal image build`"
            ) from None
        except NotADirectoryError:
            raise ImageNotFoundError(f"{p} is not a Tidal image directory") from None
        return cls(p, ImageManifest.from_json(text, str(mf)), source_factory)

    def _local_source(self, digest: Digest, size: int) -> RandomAccessSource:
        src = FileSource(blob_path(self.path, digest))
        if src.size_bytes != size:
            raise FormatError(
                f"layer blob {short_digest(digest)} in {self.path} is {src.size_bytes} bytes, manifest says {size}"
            )
        return src

    def layers(self) -> list[ReadOnlyLayer]:
        """The data layers, bottom first, opened (reads only each blob's tail)."""
        if self._layers is None:
            opened = []
            for rec in self.manifest.data_layers:
                opened.append(
                    ReadOnlyLayer(
                        self._factory(rec.digest, rec.size_bytes),
                        expected_tail_crc=rec.tail_crc32,
                        expected_index_sha256=rec.index_sha256,
                    )
                )
            self._layers = opened
        return self._layers

    def merged_view(self) -> MergedView:
        return MergedView(self.layers(), self.manifest.size_bytes)

    def writable(self, path: str | os.PathLike[str], *, create: bool = True) -> WritableLayer:
        """A writable layer in ``path`` on top of this image (created if absent)."""
        p = Path(path)
        if (p / "meta.json").exists():
            wl = WritableLayer.open(p, self.layers())
            if wl.size_bytes != self.manifest.size_bytes:
                wl.close()
                raise FormatError(
                    f"writable layer {p} is for a {wl.size_bytes}-byte device, image is {self.manifest.size_bytes}"
                )
            return wl
        if not create:
            raise ImageNotFoundError(f"no writable layer in {p}")
        return WritableLayer.create(p, self.manifest.size_bytes, self.layers())

    def verify(self, progress: Callable[[str], None] | None = None) -> int:
        """Check every blob's sha256 and every chunk's checksum; returns chunks checked."""
        checked = 0
        for i, rec in enumerate(self.manifest.layers):
            where = f"layer {i} ({short_digest(rec.digest)}) of {self.path}"
            if progress:
                progress(where)
            path = blob_path(self.path, rec.digest)
            if not path.exists():
                raise ImageNotFoundError(f"{where}: blob file {path} is missing")
            actual = sha256_file(path)
            if actual != rec.digest:
                raise ChecksumError(
                    f"{where}: blob digest is {short_digest(actual)}, manifest says {short_digest(rec.digest)}"
                )
            if rec.kind == LAYER_KIND_DATA:
                with FileSource(path) as src:
                    try:
                        layer = ReadOnlyLayer(
                            src,
                            expected_tail_crc=rec.tail_crc32,
                            expected_index_sha256=rec.index_sha256,
                            decoded_cache_chunks=0,
                        )
                        checked += layer.zfile.verify()
                    except (FormatError, ChecksumError) as exc:
                        raise type(exc)(f"{where}: {exc}") from exc
        return checked


class ImageWriter:
    """Adds layer blobs to an image directory and writes its manifest atomically."""

    def __init__(self, path: str | os.PathLike[str], size_bytes: int) -> None:
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.records: list[LayerRecord] = []
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def add_blob_file(self, tmp: Path) -> tuple[Digest, int]:
        """Move a finished blob file into the store under its digest."""
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, blob_path(self.path, digest))
        return digest, size

    def commit_layer(
        self,
        writable: WritableLayer,
        *,
        codec: Codec | str = Codec.LZ4,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        level: int | None = None,
        source_digest: str | None = None,
        source_diff_id: str | None = None,
    ) -> tuple[LayerRecord, CommitInfo]:
        """Commit ``writable`` into a new top layer blob of this image."""
        place = functools.partial(blob_path, self.path)
        with write_by_digest(self.path / "blobs", place, prefix=".layer-") as hw:
            info = writable.commit(hw, chunk_size_bytes=chunk_size_bytes, codec=codec, level=level)  # type: ignore[arg-type]
        digest = hw.digest
        with FileSource(blob_path(self.path, digest)) as src:
            layer = ReadOnlyLayer(src, decoded_cache_chunks=0)
            tail_crc = layer.zfile.tail_crc32
            index_sha256 = layer.zfile.index_sha256 if layer.zfile.has_digests else None
        rec = LayerRecord(
            digest=digest,
            size_bytes=hw.size_bytes,
            raw_data_bytes=info.zfile.raw_size_bytes,
            extent_count=info.extent_count,
            codec=info.zfile.codec.name.lower(),
            chunk_size_bytes=info.zfile.chunk_size_bytes,
            tail_crc32=tail_crc,
            source_digest=source_digest,
            source_diff_id=source_diff_id,
            index_sha256=index_sha256,
        )
        self.records.append(rec)
        return rec, info

    def add_record(self, rec: LayerRecord) -> None:
        self.records.append(rec)

    def write_manifest(
        self,
        *,
        config: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
        fs_type: str = "ext4",
    ) -> ImageManifest:
        manifest = ImageManifest(
            size_bytes=self.size_bytes,
            layers=tuple(self.records),
            fs_type=fs_type,
            config=dict(config or {}),
            annotations=dict(annotations or {}),
        )
        write_text_atomic(self.path / "manifest.json", manifest.to_json(), fsync=True)
        return manifest


def attach_trace(image_dir: str | os.PathLike[str], trace_blob: bytes) -> LayerRecord:
    """Store an access trace (``Trace.serialize()``) as the image's trace layer.

    Replaces an earlier trace layer; the data layers, and so the image's content, are
    unchanged. The manifest is rewritten atomically.
    """
    image = Image.open(image_dir)
    store = image.path / "blobs" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    with write_by_digest(
        store.parent, functools.partial(blob_path, image.path), prefix=".trace-"
    ) as hw:
        hw.write(trace_blob)
    digest = hw.digest
    rec = LayerRecord(
        digest=digest,
        size_bytes=len(trace_blob),
        raw_data_bytes=len(trace_blob),
        extent_count=0,
        codec="none",
        chunk_size_bytes=0,
        tail_crc32=0,
        kind=LAYER_KIND_TRACE,
    )
    old = image.manifest
    layers = (*(r for r in old.layers if r.kind != LAYER_KIND_TRACE), rec)
    manifest = ImageManifest(
        size_bytes=old.size_bytes,
        layers=layers,
        fs_type=old.fs_type,
        config=old.config,
        annotations=old.annotations,
    )
    write_text_atomic(image.path / "manifest.json", manifest.to_json(), fsync=True)
    return rec
