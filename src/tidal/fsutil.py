"""Small file-system helpers every part needs (core: imports only ``tidal.ids``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import select
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from tidal.ids import Digest


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, binary: bool = False, fsync: bool = False
) -> Iterator[IO[Any]]:
    """Write ``path`` through a hidden sibling renamed over it at the end, so a reader sees the
    old or the new file, never a torn one (rename is atomic within a filesystem). On an
    exception the sibling is removed and ``path`` is untouched.

    ``fsync`` also survives a power cut (the data reaches the disk before the rename). For
    streams whose final name is known before writing; a blob named by its digest after the
    write is a different shape (see the stores).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb" if binary else "w") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, fsync=fsync) as fh:
        fh.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, binary=True, fsync=fsync) as fh:
        fh.write(data)


def write_json_atomic(
    path: str | os.PathLike[str],
    doc: object,
    *,
    fsync: bool = False,
    indent: int | None = 2,
    sort_keys: bool = False,
) -> None:
    """:func:`write_text_atomic` of ``doc`` as JSON (indented by default) with a final newline."""
    write_text_atomic(path, json.dumps(doc, indent=indent, sort_keys=sort_keys) + "\n", fsync=fsync)


def copy_sparse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy ``src`` to a new file ``dst`` of the same size, only its data (SEEK_DATA /
    SEEK_HOLE), in the kernel (``copy_file_range``): the holes stay holes. Returns the bytes
    copied. Why by hand: shutil copies every byte of a hole as zeros, which turns a sparse
    10 GiB volume file into 10 GiB of disk."""
    copied = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        off = 0
        while off < size:
            try:
                start = os.lseek(fin.fileno(), off, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole from here on
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - pos, pos, pos)
                if n == 0:
                    break
                pos += n
            copied += pos - start
            off = end
    return copied


class HashingWriter:
    """A write-only file wrapper that computes the sha256 and size of what passes through."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self._fh.write(data)
        self.size_bytes += len(data)
        return len(data)

    def tell(self) -> int:
        raise OSError("not seekable")

    def seekable(self) -> bool:
        return False

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


class HashingReader(io.RawIOBase):
    """A read-only stream wrapper that hashes and counts what passes through.

    ``algorithm`` is a :mod:`hashlib` name (an OCI digest's algorithm part). :meth:`drain`
    reads what the consumer left unread (a tar reader stops at the end-of-archive marker),
    so that the digest covers the whole stream.
    """

    def __init__(self, fh: IO[bytes], algorithm: str = "sha256") -> None:
        self._fh = fh
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._fh.read(len(b))
        n = len(data)
        b[:n] = data
        self._hash.update(data)
        self.size_bytes += n
        return n

    def drain(self, chunk_bytes: int = 1 << 20) -> int:
        """Read to the end; returns how many bytes were left unread."""
        left = 0
        while data := self.read(chunk_bytes):
            left += len(data)
        return left

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"


@contextlib.contextmanager
def write_by_digest(
    directory: str | os.PathLike[str],
    place: Callable[[Digest], Path],
    *,
    prefix: str = ".blob-",
    check: Callable[[Digest], None] | None = None,
    mode: int | None = None,
) -> Iterator[HashingWriter]:
    """Stream a blob whose name is its digest, known only once the last byte is written.

    Yields a :class:`HashingWriter` over a temporary file in ``directory``; at the end the
    file is fsynced, ``check(digest)`` may refuse it (by raising), ``mode`` is applied, and it
    is renamed to ``place(digest)``. On any exception the temporary file is removed. (The other
    shape of :func:`atomic_file`: there the final name is known before the first byte.)
    """
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = HashingWriter(fh)
            yield writer
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(writer.digest)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, place(writer.digest))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_line(fd: int, timeout_s: float) -> str:
    """The first line a child writes on a pipe (its "ready" report), or what came before the
    timeout or EOF; never blocks longer than ``timeout_s``. Bytes after the line are dropped."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    poller = select.poll()  # not select(): a daemon's fds can be numbered past 1024
    poller.register(fd, select.POLLIN)
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not poller.poll(max(1, math.ceil(left * 1000))):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()
