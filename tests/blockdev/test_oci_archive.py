"""Parsing source images without the kernel: layouts, archives and the errors for bad ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tidal.blockdev.oci_archive import open_source_image
from tidal.errors import ArchiveFormatError, NotFoundError
from tidal.testing.oci_builder import LayerTar, tar_directory, write_oci_layout


def _layers() -> list[bytes]:
    a, b = LayerTar(), LayerTar()
    a.add_raw("etc/hosts", data=b"one")
    b.add_raw("etc/motd", data=b"two")
    return [a.bytes(), b.bytes()]


@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "oci-archive"])
def test_oci_layout_layers_open_decompressed(tmp_path: Path, as_tar: bool) -> None:
    info = write_oci_layout(tmp_path / "oci", _layers(), compress=[True, False])
    path = tmp_path / "oci"
    if as_tar:
        tar_directory(path, tmp_path / "oci.tar")
        path = tmp_path / "oci.tar"
    src = open_source_image(path)
    assert [la.digest for la in src.layers] == [d["digest"] for d in info["layers"]]
    assert [la.diff_id for la in src.layers] == info["diff_ids"]
    assert src.config["config"] == info["config"]["config"]
    names = []
    for layer in src.layers:
        with layer.open_tar() as tf:
            names += [m.name for m in tf]
    assert names == ["etc/hosts", "etc/motd"]


def test_docker_archive(tmp_path: Path) -> None:
    layers = _layers()
    root = tmp_path / "d"
    root.mkdir()
    for i, data in enumerate(layers):
        (root / f"l{i}").mkdir()
        (root / f"l{i}" / "layer.tar").write_bytes(data)
    (root / "cfg.json").write_text(
        json.dumps(
            {
                "config": {"Cmd": ["x"]},
                "rootfs": {"diff_ids": ["sha256:" + hashlib.sha256(d).hexdigest() for d in layers]},
            }
        )
    )
    (root / "manifest.json").write_text(
        json.dumps([{"Config": "cfg.json", "Layers": ["l0/layer.tar", "l1/layer.tar"]}])
    )
    tar_directory(root, tmp_path / "d.tar")
    src = open_source_image(tmp_path / "d.tar")
    assert len(src.layers) == 2 and src.config["config"] == {"Cmd": ["x"]}
    with src.layers[1].open_tar() as tf:
        assert [m.name for m in tf] == ["etc/motd"]


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        open_source_image(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveFormatError, match=r"neither index\.json .* nor manifest\.json"):
        open_source_image(tmp_path / "empty")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArchiveFormatError, match=r"junk\.tar"):
        open_source_image(tmp_path / "junk.tar")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(ArchiveFormatError, match=r"index\.json is not valid JSON"):
        open_source_image(tmp_path / "bad")


def test_corrupt_layer_stream_is_an_archive_error(tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "oci", [b"\0garbage" * 1000], compress=[False])
    src = open_source_image(tmp_path / "oci")
    with (
        pytest.raises(ArchiveFormatError, match="not a valid tar stream"),
        src.layers[0].open_tar() as tf,
    ):
        list(tf)
