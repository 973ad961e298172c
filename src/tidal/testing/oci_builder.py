"""Write OCI image layouts and docker-archives from layer tars, for conversion tests.

Independent of the code under test: plain ``tarfile``, ``hashlib`` and ``json`` following the
OCI image-layout and image-spec documents.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class LayerTar:
    """A layer tar assembled member by member."""

    buf: io.BytesIO = field(default_factory=io.BytesIO)

    def __post_init__(self) -> None:
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add_path(self, root: Path, rel: str, *, xattrs: bool = True) -> None:
        """Add ``root/rel`` as it is on disk (metadata from lstat, xattrs as PAX headers)."""
        full = root / rel
        ti = self.tf.gettarinfo(str(full), arcname=rel)
        ti.uname = ti.gname = ""
        if xattrs and not stat.S_ISLNK(os.lstat(full).st_mode):
            headers = dict(ti.pax_headers)
            for name in os.listxattr(full, follow_symlinks=False):
                headers["SCHILY.xattr." + name] = os.getxattr(
                    full, name, follow_symlinks=False
                ).decode("utf-8", "surrogateescape")
            ti.pax_headers = headers
        if ti.isfile():
            with full.open("rb") as fh:
                self.tf.addfile(ti, fh)
        else:
            self.tf.addfile(ti)

    def add_tree(self, root: Path) -> None:
        """Every entry below ``root`` in sorted walk order (directories first)."""
        self.add_path(root, ".")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                self.add_path(root, rel)

    def add_raw(
        self,
        name: str,
        *,
        data: bytes = b"",
        kind: bytes = tarfile.REGTYPE,
        linkname: str = "",
        mode: int = 0o644,
    ) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.linkname = linkname
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        ti.mtime = 1_700_000_000
        ti.uid, ti.gid = os.getuid(), os.getgid()  # so that tests without root can chown
        self.tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    def whiteout(self, path: str) -> None:
        parent, _, base = path.rpartition("/")
        self.add_raw(f"{parent}/.wh.{base}".lstrip("/"), mode=0o600)

    def opaque(self, directory: str) -> None:
        self.add_raw(f"{directory}/.wh..wh..opq", mode=0o600)

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def write_oci_layout(
    out: Path,
    layers: list[bytes],
    *,
    compress: list[bool] | None = None,
    config: dict | None = None,
) -> dict:
    """An OCI image layout directory with the given uncompressed layer tars."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descs, diff_ids = [], []
    for i, raw in enumerate(layers):
        gz = compress[i] if compress else True
        stored = gzip.compress(raw, mtime=0) if gz else raw
        (blobs / sha(stored)[7:]).write_bytes(stored)
        diff_ids.append(sha(raw))
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else ""),
                "digest": sha(stored),
                "size": len(stored),
            }
        )
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": config or {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg_bytes = json.dumps(cfg).encode()
    (blobs / sha(cfg_bytes)[7:]).write_bytes(cfg_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(cfg_bytes),
            "size": len(cfg_bytes),
        },
        "layers": descs,
    }
    m_bytes = json.dumps(manifest).encode()
    (blobs / sha(m_bytes)[7:]).write_bytes(m_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha(m_bytes),
                "size": len(m_bytes),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return {"layers": descs, "diff_ids": diff_ids, "config": cfg}


def tar_directory(src: Path, out: Path) -> None:
    """A tar of a directory's contents (an oci-archive from an OCI layout dir)."""
    with tarfile.open(out, "w") as tf:
        for entry in sorted(src.rglob("*")):
            tf.add(entry, arcname=str(entry.relative_to(src)), recursive=False)


def make_varied_tree(root: Path, *, seed: int = 11) -> None:
    """A tree that exercises the ext4 allocator: many small files in many directories, a
    large file, a hard link and a symlink."""
    rng = random.Random(seed)
    for d in range(24):
        sub = root / f"d{d:02}" / "sub"
        sub.mkdir(parents=True)
        for f in range(16):
            (root / f"d{d:02}" / f"f{f}").write_bytes(rng.randbytes(rng.randint(0, 30_000)))
        (sub / "x").write_bytes(rng.randbytes(100))
    (root / "big").write_bytes(rng.randbytes(4 << 20))
    os.link(root / "big", root / "big-link")
    os.symlink("big", root / "big-sym")


def base_and_update_layouts(work: Path) -> tuple[Path, Path]:
    """Two OCI layouts on one base: ``v1`` = [base], ``v2`` = [base, update]. The update
    whites out a file, makes a directory opaque, adds a file to a directory it does not time
    and one below parents it does not name."""
    root = work / "root"
    root.mkdir(parents=True)
    make_varied_tree(root)
    base = LayerTar()
    base.add_tree(root)
    top = LayerTar()
    top.whiteout("d03/f1")
    top.opaque("d04")
    top.add_raw("d05/new", data=b"x" * 5000)
    top.add_raw("newdir/deep/file", data=b"y" * 100)
    base_tar, top_tar = base.bytes(), top.bytes()
    write_oci_layout(work / "v1", [base_tar])
    write_oci_layout(work / "v2", [base_tar, top_tar])
    return work / "v1", work / "v2"
