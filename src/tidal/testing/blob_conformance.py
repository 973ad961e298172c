"""The BlobStore contract as a reusable check, so every implementation is held to the same rules.

A new store (a peer's cache served over HTTP, an object store) passes if
``check_blob_store(store)`` returns; tests of the local store, the in-memory fake and the
registry store all call it. It writes a few small random blobs and never deletes anything.
"""

from __future__ import annotations

import io
import os

from tidal.blobs.source import BlobSource, BlobStore
from tidal.errors import BlobIntegrityError, BlobNotFoundError, BlobRangeError
from tidal.ids import Digest, sha256_digest

ABSENT = Digest("sha256:" + "0" * 64)


class ConformanceError(AssertionError):
    """A store broke the BlobStore contract (a test failure, not a runtime error)."""


def _expect(cond: bool, store: BlobSource, what: str) -> None:
    if not cond:
        raise ConformanceError(f"{store.name}: {what}")


def check_blob_store(store: BlobStore) -> None:
    """Exercise ``store`` against the contract; raise :class:`ConformanceError` on a breach."""
    _expect(isinstance(store, BlobStore), store, "does not implement the BlobStore protocol")
    data = os.urandom(3000)
    digest = store.put(io.BytesIO(data))
    _expect(digest == sha256_digest(data), store, "put returned the wrong digest")
    _expect(store.has(digest), store, "has() is false right after put")
    _expect(store.size(digest) == len(data), store, "size() differs from the bytes put")
    _expect(store.read(digest, 0, len(data)) == data, store, "whole read differs")
    _expect(store.read(digest, 17, 2049) == data[17:2049], store, "range read differs")
    _expect(store.read(digest, 3000, 3000) == b"", store, "empty range is not empty")
    again = store.put_bytes(data, expected_digest=digest)
    _expect(again == digest, store, "a second put of the same bytes changed the digest")

    _expect(not store.has(ABSENT), store, "has() is true for an absent blob")
    for call in (lambda: store.size(ABSENT), lambda: store.read(ABSENT, 0, 1)):
        try:
            call()
        except BlobNotFoundError:
            pass
        else:
            raise ConformanceError(f"{store.name}: an absent blob did not raise BlobNotFoundError")

    try:
        store.read(digest, 2990, 3010)
    except BlobRangeError:
        pass
    else:
        raise ConformanceError(f"{store.name}: a range past the end did not raise BlobRangeError")

    other = os.urandom(100)
    try:
        store.put_bytes(other, expected_digest=ABSENT)
    except BlobIntegrityError:
        pass
    else:
        raise ConformanceError(f"{store.name}: put with a wrong expected digest was accepted")
    _expect(not store.has(sha256_digest(other)), store, "bytes with a wrong digest were stored")
