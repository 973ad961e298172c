import hashlib
import io
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.errors import ChecksumError, ConfigError, FormatError, TidalError
from tidal.image.source import BytesSource, FileSource
from tidal.image.zfile import (
    FOOTER_SIZE,
    HEADER_SIZE,
    MAGIC,
    TABLE_ENTRY_SIZE,
    VERSION,
    Codec,
    ZFileReader,
    ZFileWriter,
    compress_bytes,
)
from tidal.testing.forging_peer import forge_keeping_crc32

CHUNK = 4096


def sample(n: int, seed: int = 1) -> bytes:
    """Half compressible text, half random bytes: exercises both stored and raw chunks."""
    rnd = os.urandom(n // 2) if seed < 0 else bytes((i * 7 + seed) % 251 for i in range(n // 2))
    text = (b"tidal block image " * (n // 18 + 1))[: n - len(rnd)]
    return text + rnd


@pytest.mark.parametrize("codec", ["lz4", "zstd", "gzip", "none"])
def test_round_trip_every_codec(codec: str) -> None:
    data = sample(50_000) + os.urandom(9000)
    blob = compress_bytes(data, chunk_size_bytes=CHUNK, codec=codec)
    r = ZFileReader(BytesSource(blob, "t.zf"))
    assert r.raw_size_bytes == len(data)
    assert r.codec is Codec.parse(codec)
    assert r.read(0, len(data)) == data
    assert r.read(4095, 2) == data[4095:4097]
    assert r.read(len(data) - 1, 1) == data[-1:]
    assert r.verify() == r.chunk_count == -(-len(data) // CHUNK)


def test_incompressible_chunk_stored_raw_and_compressible_shrinks() -> None:
    data = os.urandom(CHUNK) + bytes(CHUNK)
    r = ZFileReader(BytesSource(compress_bytes(data, chunk_size_bytes=CHUNK)))
    assert r.span(0).is_raw and r.span(0).stored_size == CHUNK
    assert not r.span(1).is_raw and r.span(1).stored_size < 100


def test_header_is_final_on_seekable_output() -> None:
    data = sample(10_000)
    blob = compress_bytes(data, chunk_size_bytes=CHUNK)
    magic, version, codec, flags, chunk, raw = struct.unpack_from("<8sHBBIQ", blob)
    assert (magic, version, codec, flags & 1, chunk, raw) == (
        MAGIC,
        VERSION,
        int(Codec.LZ4),
        1,
        CHUNK,
        len(data),
    )


def test_reads_only_the_tail_and_the_touched_chunks(tmp_path) -> None:
    data = os.urandom(64 * CHUNK)
    path = tmp_path / "blob"
    path.write_bytes(compress_bytes(data, chunk_size_bytes=CHUNK, codec="none"))
    with FileSource(path) as src:
        r = ZFileReader(src, decoded_cache_chunks=0)
        opened = src.bytes_read
        assert opened == FOOTER_SIZE + 64 * TABLE_ENTRY_SIZE  # footer + chunk table, nothing else
        assert r.read(10 * CHUNK + 5, 100) == data[10 * CHUNK + 5 : 10 * CHUNK + 105]
        assert src.bytes_read - opened == CHUNK  # exactly one chunk


@given(
    data=st.binary(min_size=0, max_size=30_000),
    ranges=st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 9000)), max_size=10),
    codec=st.sampled_from(["lz4", "zstd"]),
)
@settings(max_examples=60, deadline=None)
def test_any_range_matches_the_input(
    data: bytes, ranges: list[tuple[int, int]], codec: str
) -> None:
    r = ZFileReader(BytesSource(compress_bytes(data, chunk_size_bytes=CHUNK, codec=codec)))
    for off, n in ranges:
        off = min(off, len(data))
        n = min(n, len(data) - off)
        assert r.read(off, n) == data[off : off + n]
        spans = r.chunk_spans(off, n)
        assert [s.index for s in spans] == (
            list(range(off // CHUNK, (off + n - 1) // CHUNK + 1)) if n else []
        )


def test_streaming_writer_memory_is_one_chunk() -> None:
    out = io.BytesIO()
    w = ZFileWriter(out, chunk_size_bytes=CHUNK)
    for _ in range(100):
        w.write(os.urandom(CHUNK * 3 + 17))
        assert len(w._buf) < CHUNK  # never more than one partial chunk buffered
    w.close()


def test_metadata_payload_round_trip() -> None:
    blob = compress_bytes(b"x" * 10_000, chunk_size_bytes=CHUNK, metadata=b"extent-index-bytes")
    assert ZFileReader(BytesSource(blob)).metadata == b"extent-index-bytes"


def _blob() -> bytes:
    return compress_bytes(sample(40_000), chunk_size_bytes=CHUNK, codec="lz4")


def test_corrupted_chunk_raises_checksum_error_naming_chunk() -> None:
    blob = bytearray(_blob())
    blob[HEADER_SIZE + 10] ^= 0xFF
    r = ZFileReader(BytesSource(bytes(blob), "layer.zf"))
    with pytest.raises(
        ChecksumError, match=r"chunk 0 of layer.zf at offset 64 failed its sha256 check"
    ):
        r.read(0, 100)
    with pytest.raises(ChecksumError):
        r.verify()


def test_truncated_blob() -> None:
    blob = _blob()
    with pytest.raises(FormatError, match="truncated"):
        ZFileReader(BytesSource(blob[:-10], "cut.zf"))
    with pytest.raises(FormatError, match="too short"):
        ZFileReader(BytesSource(blob[:20], "tiny.zf"))


def test_wrong_magic() -> None:
    with pytest.raises(FormatError, match=r"not a ZFile \(bad magic"):
        ZFileReader(BytesSource(b"PK\x03\x04" + bytes(200), "zip.zf"))


def test_wrong_version() -> None:
    blob = bytearray(_blob())
    foot = len(blob) - FOOTER_SIZE
    struct.pack_into("<H", blob, foot + 8, 99)
    struct.pack_into("<I", blob, len(blob) - 4, zlib.crc32(bytes(blob[foot:-4])))
    with pytest.raises(FormatError, match="version 99 is not supported"):
        ZFileReader(BytesSource(bytes(blob)))


def test_corrupt_table_and_footer() -> None:
    blob = bytearray(_blob())
    blob[-FOOTER_SIZE - 3] ^= 1  # inside the chunk table
    with pytest.raises(ChecksumError, match="chunk table"):
        ZFileReader(BytesSource(bytes(blob)))
    blob = bytearray(_blob())
    blob[-FOOTER_SIZE + 20] ^= 1  # inside the footer
    with pytest.raises(ChecksumError, match="footer"):
        ZFileReader(BytesSource(bytes(blob)))


def test_errors_are_tidal_errors_and_bad_settings_rejected() -> None:
    assert issubclass(ChecksumError, TidalError) and issubclass(FormatError, TidalError)
    with pytest.raises(ConfigError, match="chunk size"):
        ZFileWriter(io.BytesIO(), chunk_size_bytes=100)
    with pytest.raises(ConfigError, match="unknown codec"):
        Codec.parse("brotli")


def test_read_outside_contents() -> None:
    r = ZFileReader(BytesSource(compress_bytes(b"abc" * 100, chunk_size_bytes=CHUNK)))
    with pytest.raises(FormatError, match="outside"):
        r.read(290, 20)


# --- authentication: sha256 per chunk, the table pinned by the manifest ----------------------


def _tail_bounds(blob: bytes) -> tuple[int, int, int]:
    """(table start, chunk count, footer start) of a version 2 blob without metadata."""
    foot = len(blob) - FOOTER_SIZE
    count = struct.unpack_from("<Q", blob, foot + 24)[0]
    return foot - count * TABLE_ENTRY_SIZE, count, foot


def test_a_chunk_forged_to_keep_its_crc32_is_refused_by_sha256() -> None:
    data = os.urandom(CHUNK * 3)  # incompressible: chunks stored raw, so any bytes "decompress"
    blob = bytearray(compress_bytes(data, chunk_size_bytes=CHUNK, codec="lz4"))
    r = ZFileReader(BytesSource(bytes(blob)))
    sp = r.span(1)
    stored = bytes(blob[sp.stored_offset : sp.stored_offset + sp.stored_size])
    forged = forge_keeping_crc32(stored)
    assert zlib.crc32(forged) == zlib.crc32(stored) and forged != stored
    blob[sp.stored_offset : sp.stored_offset + sp.stored_size] = forged
    reader = ZFileReader(BytesSource(bytes(blob), "forged.zf"))
    assert reader.has_digests
    assert not reader.verify_chunk_bytes(1, forged)
    with pytest.raises(ChecksumError, match=r"chunk 1 of forged.zf .* sha256"):
        reader.read(CHUNK, 10)


def test_a_forged_table_is_refused_against_the_pinned_digest() -> None:
    """Rewrite a chunk AND its table entry (sha256, crc32), fix every crc32: only the digest
    the manifest pins tells the forgery."""
    data = os.urandom(CHUNK * 2)
    blob = bytearray(compress_bytes(data, chunk_size_bytes=CHUNK))
    pinned = ZFileReader(BytesSource(bytes(blob))).index_sha256
    table, _count, foot = _tail_bounds(bytes(blob))
    forged = b"X" * CHUNK
    blob[HEADER_SIZE : HEADER_SIZE + CHUNK] = forged
    struct.pack_into(
        "<II32s",
        blob,
        table,
        CHUNK | 0x8000_0000,
        zlib.crc32(forged),
        hashlib.sha256(forged).digest(),
    )
    struct.pack_into("<I", blob, foot + 40, zlib.crc32(bytes(blob[table:foot])))
    struct.pack_into("<I", blob, len(blob) - 4, zlib.crc32(bytes(blob[foot:-4])))
    unpinned = ZFileReader(BytesSource(bytes(blob)))
    assert unpinned.read(0, 4) == b"XXXX"  # self-consistent: only the pin can tell
    with pytest.raises(ChecksumError, match="does not match the digest its manifest pins"):
        ZFileReader(BytesSource(bytes(blob)), expected_index_sha256=pinned)
    ok = ZFileReader(
        BytesSource(compress_bytes(data, chunk_size_bytes=CHUNK)), expected_index_sha256=pinned
    )
    assert ok.read(0, CHUNK) == data[:CHUNK]


def _as_version_1(blob: bytes) -> bytes:
    """The same file in the crc32-only layout of version 1 (8-byte table entries)."""
    table, count, foot = _tail_bounds(blob)
    entries = b"".join(
        blob[table + i * TABLE_ENTRY_SIZE : table + i * TABLE_ENTRY_SIZE + 8] for i in range(count)
    )
    footer = bytearray(blob[foot:])
    struct.pack_into("<H", footer, 8, 1)
    struct.pack_into("<I", footer, 40, zlib.crc32(entries))
    struct.pack_into("<I", footer, FOOTER_SIZE - 4, zlib.crc32(bytes(footer[:-4])))
    return blob[:table] + entries + bytes(footer)


def test_version_1_files_are_still_read_by_crc32() -> None:
    data = sample(20_000)
    old = _as_version_1(compress_bytes(data, chunk_size_bytes=CHUNK))
    r = ZFileReader(BytesSource(old, "old.zf"))
    assert r.version == 1 and not r.has_digests and r.span(0).sha256 is None
    assert r.read(0, len(data)) == data
    assert r.verify() == r.chunk_count
