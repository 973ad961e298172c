"""Property: applying random layer stacks gives the tree a simple model of OCI semantics says.

The model is a dict ``path -> ("dir",) | ("file", bytes) | ("link", target)``; whiteouts and
opaque markers hide lower entries only; adding a path replaces what was there (a directory
survives a directory entry). Runs without root (owners are the current user's).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.blockdev.layer_tar import TreeWriter, extract, scan_layer

Model = dict[str, tuple]

NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["file", "dir", "link", "whiteout", "opaque"]),
        PATHS,
        st.binary(max_size=64),
    ),
    max_size=8,
)


def _drop(model: Model, path: str, *, keep_self: bool = False) -> None:
    for p in [p for p in model if p.startswith(path + "/") or (p == path and not keep_self)]:
        del model[p]


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def model_apply(model: Model, ops: list[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    """Apply one layer to the model; returns the ops kept (valid ones, one per path)."""
    seen: set[str] = set()
    kept = []
    lower = dict(model)
    for kind, path, data in ops:
        if path in seen:
            continue
        seen.add(path)
        if kind == "whiteout":
            if all(lower.get(p, ("dir",))[0] == "dir" for p in _parents(path)):
                _drop(model, path)
            kept.append((kind, path, data))
        elif kind == "opaque":
            if lower.get(path, ("",))[0] == "dir":
                for p in [p for p in lower if p.startswith(path + "/")]:
                    model.pop(p, None)
            kept.append((kind, path, data))
    for kind, path, data in ops:
        if kind in ("whiteout", "opaque") or (kind, path, data) in kept:
            continue
        if any(model.get(p, ("dir",))[0] != "dir" for p in _parents(path)):
            continue  # a tar cannot put an entry below a file or symlink
        if any(k in ("whiteout", "opaque") and p == path for k, p, _ in kept):
            continue
        if any(p == path for _, p, _ in kept):
            continue
        for p in _parents(path):
            model.setdefault(p, ("dir",))
        if kind == "dir":
            if model.get(path, ("",))[0] != "dir":
                _drop(model, path)
                model[path] = ("dir",)
        else:
            _drop(model, path)
            model[path] = ("file", data) if kind == "file" else ("link", f"/target/{data.hex()}")
        kept.append((kind, path, data))
    return kept


def layer_tar(ops: list[tuple[str, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, path, data in ops:
            if kind == "whiteout":
                parent, _, base = path.rpartition("/")
                ti = tarfile.TarInfo(f"{parent}/.wh.{base}".lstrip("/"))
            elif kind == "opaque":
                ti = tarfile.TarInfo(f"{path}/.wh..wh..opq")
            else:
                ti = tarfile.TarInfo(path)
                ti.type = {
                    "file": tarfile.REGTYPE,
                    "dir": tarfile.DIRTYPE,
                    "link": tarfile.SYMTYPE,
                }[kind]
                if kind == "link":
                    ti.linkname = f"/target/{data.hex()}"
            ti.uid, ti.gid, ti.mode = os.getuid(), os.getgid(), 0o755 if kind == "dir" else 0o644
            if ti.type == tarfile.REGTYPE and kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def read_tree(root: Path) -> Model:
    out: Model = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", full.read_bytes())
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=4))
def test_layer_stack_matches_the_model(layers: list[list[tuple[str, str, bytes]]]) -> None:
    model: Model = {}
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        for ops in layers:
            kept = model_apply(model, ops)
            data = layer_tar(kept)
            with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
                scan = scan_layer(tf)
            with TreeWriter(root) as writer:
                writer.apply_whiteouts(scan)
                with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
                    extract(tf, writer)
            assert read_tree(root) == model
