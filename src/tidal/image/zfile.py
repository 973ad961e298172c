"""ZFile: a compressed blob that keeps random access.

Data is cut into chunks of a fixed raw size, each compressed on its own, so a read of any
byte range decompresses only the chunks it overlaps. The format is general (not tied to
images); a layer stores its extent index in the optional ``metadata`` payload.

Layout (all integers little-endian)::

    header   64 B   magic "TIDALZF\\0", version u16, codec u8, flags u8, chunk_size u32,
                    raw_size u64 (final when flags has HEADER_FINAL), reserved
    chunks          chunk 0 .. n-1, stored back to back (compressed, or raw if it did not shrink)
    metadata        opaque bytes (may be empty)
    table   40n B   per chunk: stored_size u32 (top bit set = stored raw), crc32 of stored bytes
                    u32, sha256 of stored bytes 32 B (version 1: 8n B, no sha256)
    footer   64 B   magic "TIDALZT\\0", version u16, codec u8, flags u8, chunk_size u32,
                    raw_size u64, chunk_count u64, metadata_size u64, crc32(metadata+table) u32,
                    zero padding, crc32(footer[:-4]) u32

**Every byte is checked against a digest an attacker cannot forge** (version 2). Each chunk's
sha256 is in the table; the table, the metadata and the footer together have a digest of their
own, :attr:`ZFileReader.index_sha256`, which the image manifest records per layer (and the OCI
manifest carries as an annotation, so the chain starts at a manifest pinned by its digest). A
reader given that digest (``expected_index_sha256``) refuses a forged table; a chunk whose bytes
do not hash to the table's entry is refused whichever source served it (registry, peer, cache).
The crc32s stay: they are the cheap torn-write check of the node's own chunk cache and the
only check of version 1 files, which are still read (the image layer decides the policy).
Why sha256 and not BLAKE3: measured in ``benchmarks/bench_zfile.py`` (hashing one 64 KiB chunk
is within a factor of ~2 of BLAKE3 with this CPU's SHA extensions, below the cost of
decompressing it, and the rest of the OCI chain is sha256 already -- no new dependency).

Chunk offsets are not stored: they are the prefix sums of stored sizes from the end of the
header, so the table costs 8 bytes per chunk. A reader fetches the footer, then metadata and
table (the tail of the blob), then only the chunks it needs.

Default chunk size 64 KiB: big enough for lz4 to reach most of its ratio and to keep the
per-chunk cost (Python call, table entry, HTTP range) small; small enough that a random 4 KiB
read decompresses at most 64 KiB. The kernel's readahead through a loop device issues up to
128 KiB requests, i.e. two chunks.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

import lz4.block
import zstandard

from tidal.errors import ChecksumError, ConfigError, FormatError
from tidal.image.source import RandomAccessSource

MAGIC = b"TIDALZF\0"
FOOTER_MAGIC = b"TIDALZT\0"
VERSION = 2
VERSION_CRC_ONLY = 1
"""Tables without chunk digests (crc32 only): still read, flagged by :attr:`ZFileReader.has_digests`."""
HEADER_SIZE = 64
FOOTER_SIZE = 64
TABLE_ENTRY_SIZE = 40
TABLE_ENTRY_SIZE_V1 = 8
DIGEST_SIZE = 32
DEFAULT_CHUNK_SIZE_BYTES = 64 * 1024
MIN_CHUNK_SIZE_BYTES = 4096
MAX_CHUNK_SIZE_BYTES = 16 * 1024 * 1024
RAW_FLAG = 0x8000_0000
FLAG_HEADER_FINAL = 0x01
DEFAULT_DECODED_CACHE_CHUNKS = 32
"""Decompressed chunks kept per reader: small reads within one chunk decompress it once."""

_HEADER = struct.Struct("<8sHBBIQ")  # 24 bytes used, rest reserved (zero)
_FOOTER = struct.Struct("<8sHBBIQQQI")  # 44 bytes, then padding, then crc32 of footer[:-4]
_ENTRY = struct.Struct("<II32s")
_ENTRY_V1 = struct.Struct("<II")


def zfile_tail_start(footer: bytes, blob_size: int) -> int | None:
    """Where the metadata + table a ZFile footer describes would start (None: not a footer)."""
    if len(footer) != FOOTER_SIZE:
        return None
    magic, version, _codec, _flags, _chunk, _raw, count, meta_size, _crc = _FOOTER.unpack_from(
        footer
    )
    if magic != FOOTER_MAGIC or version not in (VERSION, VERSION_CRC_ONLY):
        return None
    entry = _ENTRY if version >= VERSION else _ENTRY_V1
    start = blob_size - FOOTER_SIZE - meta_size - count * entry.size
    return start if start >= HEADER_SIZE else None


def zfile_tail_size(
    raw_size_bytes: int, chunk_size_bytes: int, metadata_size_bytes: int, *, version: int = VERSION
) -> int:
    """Bytes of metadata + chunk table (footer excluded) of a ZFile with these sizes, so a
    reader that knows them (a layer's manifest record) fetches tail and footer in one request."""
    if chunk_size_bytes <= 0:
        raise ValueError(f"chunk size {chunk_size_bytes} is not positive")
    entry = _ENTRY if version >= VERSION else _ENTRY_V1
    count = (raw_size_bytes + chunk_size_bytes - 1) // chunk_size_bytes
    return metadata_size_bytes + count * entry.size


def index_digest(tail: bytes, footer: bytes) -> str:
    """The digest a manifest pins for a ZFile: sha256 of metadata + table + footer."""
    return "sha256:" + hashlib.sha256(tail + footer).hexdigest()


class Codec(IntEnum):
    """Per-chunk compression codec."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2
    GZIP = 3  # raw deflate; kept for compatibility with gzip-minded tooling

    @classmethod
    def parse(cls, name: str | Codec) -> Codec:
        if isinstance(name, Codec):
            return name
        try:
            return cls[name.upper()]
        except KeyError:
            raise ConfigError(
                f"unknown codec {name!r}; choose one of lz4, zstd, gzip, none"
            ) from None


@dataclass(frozen=True)
class ChunkSpan:
    """Where chunk ``index`` lives in the blob, and how to check it."""

    index: int
    stored_offset: int
    stored_size: int
    raw_size: int
    crc32: int
    is_raw: bool
    sha256: bytes | None = None
    """The stored bytes' sha256 (None in a version 1 file)."""


@dataclass(frozen=True)
class ZFileInfo:
    """What a writer produced."""

    raw_size_bytes: int
    stored_size_bytes: int
    chunk_count: int
    chunk_size_bytes: int
    codec: Codec
    tail_crc32: int = 0
    index_sha256: str = ""
    """``sha256:<hex>`` of metadata + table + footer: what a manifest pins (see the module)."""


def _compressor(codec: Codec, level: int | None) -> Callable[[bytes], bytes]:
    if codec is Codec.LZ4:
        return lambda raw: lz4.block.compress(raw, store_size=False)
    if codec is Codec.ZSTD:
        zc = zstandard.ZstdCompressor(level=3 if level is None else level)
        return zc.compress
    if codec is Codec.GZIP:
        lvl = 6 if level is None else level
        return lambda raw: _deflate(raw, lvl)
    return lambda raw: raw


def _deflate(raw: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush()


_tls = threading.local()


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread: creating one per chunk halves throughput, sharing is unsafe."""
    d = getattr(_tls, "zstd", None)
    if d is None:
        d = _tls.zstd = zstandard.ZstdDecompressor()
    return d


def _decompress(codec: Codec, stored: bytes, raw_size: int) -> bytes:
    if codec is Codec.LZ4:
        return lz4.block.decompress(stored, uncompressed_size=raw_size)
    if codec is Codec.ZSTD:
        return _zstd_decompressor().decompress(stored, max_output_size=raw_size)
    if codec is Codec.GZIP:
        return zlib.decompress(stored, -15)
    return stored


class ZFileWriter:
    """Streaming ZFile writer: memory is bounded by one chunk whatever the input size.

    The chunk table grows by 40 bytes per chunk (0.06 % of the data at 64 KiB chunks).
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        codec: Codec | str = Codec.LZ4,
        level: int | None = None,
        metadata: bytes = b"",
    ) -> None:
        if not MIN_CHUNK_SIZE_BYTES <= chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise ConfigError(
                f"ZFile chunk size {chunk_size_bytes} is outside "
                f"[{MIN_CHUNK_SIZE_BYTES}, {MAX_CHUNK_SIZE_BYTES}] bytes"
            )
        self._out = out
        self._chunk = chunk_size_bytes
        self._codec = Codec.parse(codec)
        self._compress = _compressor(self._codec, level)
        self.metadata = metadata
        self._buf = bytearray()
        self._table = bytearray()
        self._raw_size = 0
        self._stored = 0
        self._count = 0
        self._closed = False
        self._start: int | None
        try:
            self._start = out.tell()
        except (OSError, AttributeError):
            self._start = None
        out.write(self._header(0, final=False))

    def _header(self, raw_size: int, *, final: bool) -> bytes:
        flags = FLAG_HEADER_FINAL if final else 0
        head = _HEADER.pack(MAGIC, VERSION, int(self._codec), flags, self._chunk, raw_size)
        return head.ljust(HEADER_SIZE, b"\0")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("write to a closed ZFileWriter")
        view = memoryview(data)
        while view:
            take = min(len(view), self._chunk - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._chunk:
                self._emit()

    def _emit(self) -> None:
        raw = bytes(self._buf)
        self._buf.clear()
        packed = self._compress(raw)
        if len(packed) >= len(raw):
            packed, size_word = raw, len(raw) | RAW_FLAG
        else:
            size_word = len(packed)
        self._out.write(packed)
        self._table += _ENTRY.pack(size_word, zlib.crc32(packed), hashlib.sha256(packed).digest())
        self._raw_size += len(raw)
        self._stored += len(packed)
        self._count += 1

    def close(self) -> ZFileInfo:
        """Flush the last chunk and write metadata, table and footer."""
        if self._closed:
            raise ValueError("ZFileWriter closed twice")
        if self._buf:
            self._emit()
        self._closed = True
        tail = self.metadata + bytes(self._table)
        self._out.write(tail)
        footer = _FOOTER.pack(
            FOOTER_MAGIC,
            VERSION,
            int(self._codec),
            FLAG_HEADER_FINAL,
            self._chunk,
            self._raw_size,
            self._count,
            len(self.metadata),
            zlib.crc32(tail),
        ).ljust(FOOTER_SIZE - 4, b"\0")
        footer += struct.pack("<I", zlib.crc32(footer))
        self._out.write(footer)
        if self._start is not None and self._out.seekable():
            end = self._out.tell()
            self._out.seek(self._start)
            self._out.write(self._header(self._raw_size, final=True))
            self._out.seek(end)
        return ZFileInfo(
            raw_size_bytes=self._raw_size,
            stored_size_bytes=HEADER_SIZE + self._stored + len(tail) + FOOTER_SIZE,
            chunk_count=self._count,
            chunk_size_bytes=self._chunk,
            codec=self._codec,
            tail_crc32=zlib.crc32(tail),
            index_sha256=index_digest(tail, footer),
        )

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and not self._closed:
            self.close()


def compress_bytes(data: bytes, **kwargs: object) -> bytes:
    """Whole-buffer convenience around :class:`ZFileWriter` (tests, small blobs)."""
    import io

    buf = io.BytesIO()
    w = ZFileWriter(buf, **kwargs)  # type: ignore[arg-type]
    w.write(data)
    w.close()
    return buf.getvalue()


class ZFileReader:
    """Random access into a ZFile held by any :class:`RandomAccessSource`.

    Opening reads only the footer and the tail (metadata + chunk table); each ``read`` fetches
    and decompresses only the chunks it overlaps, verifying each chunk's crc32 first.
    Thread-safe.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        *,
        decoded_cache_chunks: int = DEFAULT_DECODED_CACHE_CHUNKS,
        expected_tail_crc: int | None = None,
        expected_index_sha256: str | None = None,
    ) -> None:
        """``expected_index_sha256``: the layer's pinned :attr:`index_sha256` (from its
        manifest); a table that does not match it is refused before any chunk is read."""
        self.source = source
        name = source.name
        size = source.size_bytes
        if size < HEADER_SIZE + FOOTER_SIZE:
            raise FormatError(f"{name}: {size} bytes is too short to be a ZFile (truncated?)")
        footer = source.read_at(size - FOOTER_SIZE, FOOTER_SIZE)
        (magic, version, codec, _flags, chunk, raw, count, meta_size, tail_crc) = (
            _FOOTER.unpack_from(footer)
        )
        if magic != FOOTER_MAGIC:
            head = source.read_at(0, 8)
            if head != MAGIC:
                raise FormatError(f"{name}: not a ZFile (bad magic {head!r} at offset 0)")
            raise FormatError(
                f"{name}: ZFile footer missing at offset {size - FOOTER_SIZE} (truncated or corrupt)"
            )
        (footer_crc,) = struct.unpack_from("<I", footer, FOOTER_SIZE - 4)
        if zlib.crc32(footer[:-4]) != footer_crc:
            raise ChecksumError(
                f"{name}: ZFile footer at offset {size - FOOTER_SIZE} failed its checksum"
            )
        if version not in (VERSION, VERSION_CRC_ONLY):
            raise FormatError(
                f"{name}: ZFile version {version} is not supported (this Tidal reads "
                f"{VERSION_CRC_ONLY} and {VERSION})"
            )
        self.version = version
        self.has_digests = version >= VERSION
        """Each chunk is checked by sha256 (False: a version 1 file, crc32 only)."""
        entry = _ENTRY if self.has_digests else _ENTRY_V1
        try:
            self.codec = Codec(codec)
        except ValueError:
            raise FormatError(f"{name}: unknown codec id {codec} in ZFile footer") from None
        if not MIN_CHUNK_SIZE_BYTES <= chunk <= MAX_CHUNK_SIZE_BYTES:
            raise FormatError(f"{name}: implausible chunk size {chunk} in ZFile footer")
        if count != (raw + chunk - 1) // chunk:
            raise FormatError(f"{name}: chunk count {count} does not match raw size {raw}")
        self.chunk_size_bytes = chunk
        self.raw_size_bytes = raw
        self.chunk_count = count
        tail_size = meta_size + count * entry.size
        tail_start = size - FOOTER_SIZE - tail_size
        if tail_start < HEADER_SIZE:
            raise FormatError(f"{name}: ZFile table does not fit in {size} bytes (truncated?)")
        tail = source.read_at(tail_start, tail_size)
        if zlib.crc32(tail) != tail_crc or (
            expected_tail_crc is not None and tail_crc != expected_tail_crc
        ):
            raise ChecksumError(
                f"{name}: ZFile metadata/chunk table at offset {tail_start} failed its checksum"
            )
        self.index_sha256 = index_digest(tail, footer)
        if expected_index_sha256 is not None and self.index_sha256 != expected_index_sha256:
            raise ChecksumError(
                f"{name}: ZFile chunk table does not match the digest its manifest pins "
                f"({expected_index_sha256[:19]}...): forged or from another layer"
            )
        self.tail_crc32 = tail_crc
        self.metadata = tail[:meta_size]
        table = memoryview(tail)[meta_size:]
        self._sizes: list[int] = []
        self._crcs: list[int] = []
        self._digests: list[bytes] = []
        self._offsets: list[int] = []
        off = HEADER_SIZE
        for i in range(count):
            fields = entry.unpack_from(table, i * entry.size)
            size_word, crc = fields[0], fields[1]
            self._offsets.append(off)
            self._sizes.append(size_word)
            self._crcs.append(crc)
            if self.has_digests:
                self._digests.append(fields[2])
            off += size_word & ~RAW_FLAG
        if off != tail_start:
            raise FormatError(
                f"{name}: chunk sizes add up to offset {off} but the table starts at {tail_start} (corrupt)"
            )
        self.tail_offset = tail_start
        self._decoded: OrderedDict[int, bytes] = OrderedDict()
        self._decoded_max = decoded_cache_chunks
        self._lock = threading.Lock()
        self.chunks_decoded = 0

    def span(self, index: int) -> ChunkSpan:
        size_word = self._sizes[index]
        raw_size = min(self.chunk_size_bytes, self.raw_size_bytes - index * self.chunk_size_bytes)
        return ChunkSpan(
            index=index,
            stored_offset=self._offsets[index],
            stored_size=size_word & ~RAW_FLAG,
            raw_size=raw_size,
            crc32=self._crcs[index],
            is_raw=bool(size_word & RAW_FLAG),
            sha256=self._digests[index] if self.has_digests else None,
        )

    def chunk_spans(self, offset: int, length: int) -> list[ChunkSpan]:
        """The chunks that a raw read of ``[offset, offset+length)`` needs, in order."""
        if length <= 0:
            return []
        self._check_raw_range(offset, length)
        first = offset // self.chunk_size_bytes
        last = (offset + length - 1) // self.chunk_size_bytes
        return [self.span(i) for i in range(first, last + 1)]

    def _check_raw_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.raw_size_bytes:
            raise FormatError(
                f"{self.source.name}: read [{offset}, {offset + length}) is outside the "
                f"{self.raw_size_bytes}-byte ZFile contents"
            )

    def verify_chunk_bytes(self, index: int, stored: bytes) -> bool:
        """Whether ``stored`` is chunk ``index`` as written: its sha256 (crc32 in version 1)."""
        if len(stored) != (self._sizes[index] & ~RAW_FLAG):
            return False
        if self.has_digests:
            return hashlib.sha256(stored).digest() == self._digests[index]
        return zlib.crc32(stored) == self._crcs[index]

    def _check_stored(self, sp: ChunkSpan, stored: bytes) -> None:
        if self.verify_chunk_bytes(sp.index, stored):
            return
        what = "sha256" if self.has_digests else "crc32"
        raise ChecksumError(
            f"chunk {sp.index} of {self.source.name} at offset {sp.stored_offset} failed its "
            f"{what} checksum (forged or corrupt)"
        )

    def chunk(self, index: int) -> bytes:
        """Decompressed chunk ``index``, checked against its crc32."""
        with self._lock:
            hit = self._decoded.get(index)
            if hit is not None:
                self._decoded.move_to_end(index)
                return hit
        sp = self.span(index)
        stored = self.source.read_at(sp.stored_offset, sp.stored_size)
        self._check_stored(sp, stored)
        if sp.is_raw:
            raw = stored
        else:
            try:
                raw = _decompress(self.codec, stored, sp.raw_size)
            except (lz4.block.LZ4BlockError, zstandard.ZstdError, zlib.error) as exc:
                raise FormatError(
                    f"chunk {index} of {self.source.name} at offset {sp.stored_offset} does not "
                    f"decompress with {self.codec.name.lower()}: {exc}"
                ) from exc
        if len(raw) != sp.raw_size:
            raise FormatError(
                f"chunk {index} of {self.source.name} decompressed to {len(raw)} bytes, expected {sp.raw_size}"
            )
        with self._lock:
            self.chunks_decoded += 1
            if self._decoded_max:
                self._decoded[index] = raw
                if len(self._decoded) > self._decoded_max:
                    self._decoded.popitem(last=False)
        return raw

    def read(self, offset: int, length: int) -> bytes:
        """Raw bytes ``[offset, offset+length)``; decompresses only the overlapped chunks."""
        if length == 0:
            return b""
        self._check_raw_range(offset, length)
        cs = self.chunk_size_bytes
        first, last = offset // cs, (offset + length - 1) // cs
        if first == last:
            start = offset - first * cs
            return self.chunk(first)[start : start + length]
        parts = []
        for i in range(first, last + 1):
            raw = self.chunk(i)
            lo = max(offset - i * cs, 0)
            hi = min(offset + length - i * cs, len(raw))
            parts.append(raw[lo:hi])
        return b"".join(parts)

    def verify(self) -> int:
        """Check every chunk (checksum and decompression); returns the number checked."""
        for i in range(self.chunk_count):
            sp = self.span(i)
            stored = self.source.read_at(sp.stored_offset, sp.stored_size)
            self._check_stored(sp, stored)
            if not sp.is_raw:
                try:
                    raw = _decompress(self.codec, stored, sp.raw_size)
                except (lz4.block.LZ4BlockError, zstandard.ZstdError, zlib.error) as exc:
                    raise FormatError(
                        f"chunk {i} of {self.source.name} does not decompress: {exc}"
                    ) from exc
                if len(raw) != sp.raw_size:
                    raise FormatError(f"chunk {i} of {self.source.name} has the wrong raw size")
        return self.chunk_count
