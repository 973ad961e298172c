"""Small file-system helpers every part needs (core: imports no part of Tidal)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


def read_line(fd: int, timeout_s: float) -> str:
    """The first line a child writes on a pipe (its "ready" report), or what came before the
    timeout or EOF; never blocks longer than ``timeout_s``. Bytes after the line are dropped."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()
