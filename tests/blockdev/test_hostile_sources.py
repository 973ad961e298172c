"""Hostile and malformed source images: one ArchiveFormatError line each, nothing converted.

Each case starts from a valid OCI layout (``tidal.testing.oci_builder``, written independently
of the code under test) and breaks one thing an attacker or a broken tool could. Reading
(`open_source_image`) and streaming every layer to its end (as the converter does) must raise
a :class:`~tidal.errors.TidalError` naming the problem; nothing else may escape.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tidal.blockdev.oci_archive import open_source_image
from tidal.errors import TidalError, UnsafeArchiveError
from tidal.testing.oci_builder import LayerTar, write_oci_layout


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layout(root: Path, *, compress: bool = True) -> Path:
    a, b = LayerTar(), LayerTar()
    a.add_raw("etc/hosts", data=b"127.0.0.1 localhost\n")
    b.add_raw("etc/motd", data=b"hello\n" * 1000)
    write_oci_layout(root, [a.bytes(), b.bytes()], compress=[compress, compress])
    return root


def _index(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _manifest(root: Path) -> tuple[dict, str]:
    digest = _index(root)["manifests"][0]["digest"]
    return json.loads(_blob(root, digest).read_bytes()), digest


def _rewrite_manifest(root: Path, manifest: dict) -> None:
    """Store ``manifest`` under its own (new) digest and point the index at it."""
    data = json.dumps(manifest).encode()
    _blob(root, _sha(data)).write_bytes(data)
    index = _index(root)
    index["manifests"][0].update(digest=_sha(data), size=len(data))
    (root / "index.json").write_text(json.dumps(index))


def _rewrite_config(root: Path, change: Callable[[dict], None]) -> None:
    manifest, _ = _manifest(root)
    cfg = json.loads(_blob(root, manifest["config"]["digest"]).read_bytes())
    change(cfg)
    data = json.dumps(cfg).encode()
    _blob(root, _sha(data)).write_bytes(data)
    manifest["config"].update(digest=_sha(data), size=len(data))
    _rewrite_manifest(root, manifest)


def _set_index(root: Path, doc: object) -> None:
    (root / "index.json").write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def _layer_desc(root: Path, i: int) -> dict:
    return _manifest(root)[0]["layers"][i]


def _replace_layer_bytes(root: Path, i: int, data: bytes, *, fix_size: bool = True) -> None:
    """Swap layer ``i``'s stored bytes under its old name (and optionally its size)."""
    manifest, _ = _manifest(root)
    desc = manifest["layers"][i]
    _blob(root, desc["digest"]).write_bytes(data)
    if fix_size:
        desc["size"] = len(data)
        _rewrite_manifest(root, manifest)


def _self_index(root: Path) -> None:
    """An index blob listing itself: a loop."""
    # a fixed point is impossible with sha256, so chain two index blobs pointing at each other's
    # name is impossible too; instead nest indexes deeper than any reader should follow
    inner = _index(root)
    for _ in range(20):
        data = json.dumps(
            {**inner, "mediaType": "application/vnd.oci.image.index.v1+json"}
        ).encode()
        _blob(root, _sha(data)).write_bytes(data)
        inner = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "digest": _sha(data),
                    "size": len(data),
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                }
            ],
        }
    _set_index(root, inner)


def _tampered_layer(root: Path) -> None:
    desc = _layer_desc(root, 1)
    raw = gzip.decompress(_blob(root, desc["digest"]).read_bytes())
    forged = raw.replace(b"hello", b"HELLO")
    _replace_layer_bytes(root, 1, gzip.compress(forged, mtime=0))


def _data_after_tar_end(root: Path) -> None:
    desc = _layer_desc(root, 1)
    raw = gzip.decompress(_blob(root, desc["digest"]).read_bytes())
    _replace_layer_bytes(root, 1, gzip.compress(raw + b"\x00" * 1024 + b"EXTRA", mtime=0))


def _truncated_gzip(root: Path) -> None:
    desc = _layer_desc(root, 1)
    data = _blob(root, desc["digest"]).read_bytes()
    _replace_layer_bytes(root, 1, data[: len(data) // 2])


def _wrong_diff_id(root: Path) -> None:
    def change(cfg: dict) -> None:
        cfg["rootfs"]["diff_ids"][0] = _sha(b"something else")

    _rewrite_config(root, change)


def _tampered_manifest_same_name(root: Path) -> None:
    manifest, digest = _manifest(root)
    manifest["annotations"] = {"evil": "yes"}
    data = json.dumps(manifest).encode()
    _blob(root, digest).write_bytes(data)
    index = _index(root)
    index["manifests"][0]["size"] = len(data)
    _set_index(root, index)


def _size_lie(root: Path) -> None:
    manifest, _ = _manifest(root)
    manifest["layers"][0]["size"] += 1
    _rewrite_manifest(root, manifest)


def _missing_layer_blob(root: Path) -> None:
    _blob(root, _layer_desc(root, 0)["digest"]).unlink()


def _docker_archive(root: Path, layers: list[str], config: str = "cfg.json") -> None:
    root.mkdir()
    (root / "cfg.json").write_text(json.dumps({"rootfs": {"diff_ids": [_sha(b"x")] * len(layers)}}))
    (root / "manifest.json").write_text(json.dumps([{"Config": config, "Layers": layers}]))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "index of the wrong type": (lambda r: _set_index(r, [1, 2, 3]), "index.json is malformed"),
    "manifests not a list": (
        lambda r: _set_index(r, {"manifests": "x"}),
        "index.json is malformed",
    ),
    "entry without digest": (lambda r: _set_index(r, {"manifests": [{"size": 3}]}), "digest"),
    "non-string digest": (
        lambda r: _set_index(r, {"manifests": [{"digest": 7, "size": 3}]}),
        "Expected `str`",
    ),
    "digest with a path": (
        lambda r: _set_index(r, {"manifests": [{"digest": "sha256:../../etc/passwd", "size": 3}]}),
        "bad digest",
    ),
    "non-numeric size": (
        lambda r: _set_index(r, {"manifests": [{"digest": "sha256:" + "0" * 64, "size": "big"}]}),
        "Expected `int`",
    ),
    "index nested without end": (_self_index, "nested more than"),
    "JSON nested 100k deep": (
        lambda r: _set_index(r, b'{"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "index.json",
    ),
    "non-UTF-8 index": (lambda r: _set_index(r, b'\xff\xfe{"manifests": []}'), "not valid JSON"),
    "missing layer blob": (_missing_layer_blob, "referenced but missing"),
    "layer bytes forged under their digest": (_tampered_layer, "does not match its digest"),
    "data after the tar end": (_data_after_tar_end, "does not match its digest"),
    "gzip truncated mid-file": (_truncated_gzip, "layer sha256:"),
    "wrong rootfs.diff_ids entry": (_wrong_diff_id, "rootfs.diff_ids"),
    "manifest tampered under its own name": (
        _tampered_manifest_same_name,
        "does not match its digest",
    ),
    "layer size lie": (_size_lie, "descriptor says"),
}


def _read_everything(path: Path) -> None:
    src = open_source_image(path)
    for layer in src.layers:
        with layer.open_tar() as tf:
            for member in tf:
                if member.isfile():
                    f = tf.extractfile(member)
                    assert f is not None
                    f.read()


def test_the_untouched_layout_reads(tmp_path: Path) -> None:
    """The base every case breaks is itself fine (so each case tests its one change)."""
    _read_everything(_layout(tmp_path / "oci"))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_layout_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    breaker, says = CASES[case]
    root = _layout(tmp_path / "oci")
    breaker(root)
    with pytest.raises(TidalError) as info:
        _read_everything(root)
    message = str(info.value)
    assert says in message, message
    assert "\n" not in message and len(message) < 600, message


@pytest.mark.parametrize(
    ("layers", "config", "says"),
    [
        (["../../etc/shadow"], "cfg.json", "points outside"),
        (["a" * 8192], "cfg.json", "not a valid path"),
        (["/etc/passwd"], "cfg.json", "points outside"),
        (["l.tar"], "../cfg.json", "points outside"),
    ],
    ids=["dotdot-layer", "8k-name", "absolute-layer", "config-outside"],
)
def test_docker_archive_paths_stay_inside(
    tmp_path: Path, layers: list[str], config: str, says: str
) -> None:
    root = tmp_path / "d"
    _docker_archive(root, layers, config)
    with pytest.raises(UnsafeArchiveError, match=says):
        open_source_image(root)


@pytest.mark.parametrize(
    "case", ["layer bytes forged under their digest", "wrong rootfs.diff_ids entry"]
)
def test_convert_refuses_a_forged_layer_in_one_line(tmp_path: Path, case: str) -> None:
    """`tidal image convert` names the problem in one line and leaves no image behind."""
    import subprocess
    import sys

    root = _layout(tmp_path / "oci")
    CASES[case][0](root)
    out = tmp_path / "img"
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", "convert", str(root), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert CASES[case][1] in proc.stderr.replace("\n", " ")
    assert not out.exists()


def test_a_sparse_100_gb_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """GNU tar stores a 100 GB hole in a few bytes; the builder would write it out in full."""
    import shutil
    import subprocess

    from tidal.blockdev.builder import convert_oci
    from tidal.errors import BuildError

    tar = shutil.which("tar")
    assert tar is not None, "GNU tar is part of the base system"
    tree = tmp_path / "tree"
    tree.mkdir()
    with (tree / "huge.img").open("wb") as fh:
        fh.truncate(100 * 10**9)
    subprocess.run(
        [tar, "--sparse", "--format=gnu", "-cf", str(tmp_path / "layer.tar"), "-C", str(tree), "."],
        check=True,
        capture_output=True,
    )
    layer = (tmp_path / "layer.tar").read_bytes()
    assert len(layer) < 1 << 20  # really sparse in the tar
    from tidal.testing.oci_builder import write_oci_layout

    write_oci_layout(tmp_path / "oci", [layer], compress=[False])
    out = tmp_path / "img"
    with pytest.raises(BuildError, match=r"over \[blockdev\] max_content_bytes") as info:
        convert_oci(tmp_path / "oci", out)
    assert "93.1 GiB" in str(info.value) or "100" in str(info.value), str(info.value)
    assert not out.exists()
