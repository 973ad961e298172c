"""Small file-system helpers every part needs (core: imports no part of Tidal)."""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never a
    torn one: write a hidden sibling, then rename it over (atomic within a filesystem).

    ``fsync`` also survives a power cut (the data reaches the disk before the rename).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], doc: object, *, fsync: bool = False) -> None:
    """:func:`write_text_atomic` of ``doc`` as indented JSON with a final newline."""
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n", fsync=fsync)


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
