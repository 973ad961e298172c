"""Small file-system helpers every part needs (core: imports no part of Tidal)."""

from __future__ import annotations

import json
import os
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
