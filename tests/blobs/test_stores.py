"""The BlobStore contract, run against every store, plus the local store's crash safety."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.source import BlobRangeSource, BlobSource, BlobStore, ByteRange, copy_blob
from tidal.errors import BlobIntegrityError, BlobNotFoundError, BlobRangeError, FormatError
from tidal.ids import Digest, sha256_digest
from tidal.testing.blob_conformance import ConformanceError, check_blob_store
from tidal.testing.memory_store import MemoryBlobStore

MISSING = Digest("sha256:" + "0" * 64)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "store")
    else:
        yield MemoryBlobStore()


def test_store_satisfies_protocols(store: BlobStore) -> None:
    assert isinstance(store, BlobSource)
    assert isinstance(store, BlobStore)


def test_store_passes_the_conformance_check(store: BlobStore) -> None:
    check_blob_store(store)


def test_conformance_check_catches_a_store_that_breaks_the_contract() -> None:
    class Sloppy(MemoryBlobStore):
        def read(self, digest: Digest, start: int, end: int) -> bytes:
            return super().read(digest, start, min(end, self.size(digest)))  # no range check

    with pytest.raises(ConformanceError, match="BlobRangeError"):
        check_blob_store(Sloppy("sloppy"))


def test_put_then_read_whole_and_ranges(store: BlobStore) -> None:
    data = os.urandom(5000)
    digest = store.put(io.BytesIO(data))
    assert digest == sha256_digest(data)
    assert store.has(digest)
    assert store.size(digest) == 5000
    assert store.read(digest, 0, 5000) == data
    assert store.read(digest, 17, 4099) == data[17:4099]
    assert store.read(digest, 5000, 5000) == b""


def test_missing_blob_is_not_found(store: BlobStore) -> None:
    assert not store.has(MISSING)
    with pytest.raises(BlobNotFoundError, match="sha256:000000000000"):
        store.size(MISSING)
    with pytest.raises(FileNotFoundError):
        store.read(MISSING, 0, 1)


def test_range_outside_blob_is_refused(store: BlobStore) -> None:
    digest = store.put_bytes(b"abcdef")
    with pytest.raises(BlobRangeError, match=r"\[4, 7\)"):
        store.read(digest, 4, 7)
    with pytest.raises(BlobRangeError):
        store.read(digest, 3, 2)


def test_put_with_wrong_expected_digest_stores_nothing(store: BlobStore) -> None:
    with pytest.raises(BlobIntegrityError, match="refusing to store"):
        store.put_bytes(b"payload", expected_digest=MISSING)
    assert not store.has(MISSING)
    assert not store.has(sha256_digest(b"payload"))


def test_put_is_idempotent(store: BlobStore) -> None:
    a = store.put_bytes(b"same")
    b = store.put(io.BytesIO(b"same"), expected_digest=a)
    assert a == b
    assert store.read(a, 0, 4) == b"same"


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), cut=st.tuples(st.integers(0, 3000), st.integers(0, 3000)))
def test_range_reads_match_slices(data: bytes, cut: tuple[int, int]) -> None:
    store = MemoryBlobStore()
    digest = store.put_bytes(data)
    lo, hi = sorted(min(c, len(data)) for c in cut)
    assert store.read(digest, lo, hi) == data[lo:hi]
    src = BlobRangeSource(store, digest)
    assert src.read_at(lo, hi - lo) == data[lo:hi]


def test_blob_range_source_reports_truncation_as_format_error() -> None:
    store = MemoryBlobStore()
    digest = store.put_bytes(b"x" * 10)
    src = BlobRangeSource(store, digest)
    assert src.size_bytes == 10
    assert "sha256:" in src.name
    with pytest.raises(FormatError, match="offset 8"):
        src.read_at(8, 5)


def test_local_store_layout_and_no_temp_left_after_failed_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put_bytes(b"hello")
    assert (tmp_path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == b"hello"

    class Exploding(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise OSError("connection reset mid-stream")
            return super().read(4)

    with pytest.raises(OSError, match="mid-stream"):
        store.put(Exploding(b"abcdefgh"))
    assert os.listdir(tmp_path / "blobs" / "sha256") == [digest.split(":")[1]]
    assert store.digests() == [digest]


def test_local_store_detects_corrupted_file_on_whole_read(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put_bytes(b"original")
    store.path(digest).write_bytes(b"tampered")
    with pytest.raises(BlobIntegrityError, match="corrupt"):
        store.read(digest, 0, 8)


def test_copy_blob_streams_in_ranges(tmp_path: Path) -> None:
    src = MemoryBlobStore()
    data = os.urandom(10_000)
    digest = src.put_bytes(data)
    dst = LocalBlobStore(tmp_path)
    assert copy_blob(src, dst, digest, block_bytes=4096)
    assert dst.read(digest, 0, len(data)) == data
    assert [r for _, r in src.read_log] == [
        ByteRange(0, 4096),
        ByteRange(4096, 8192),
        ByteRange(8192, 10_000),
    ]
    assert not copy_blob(src, dst, digest)  # already there: nothing moves
