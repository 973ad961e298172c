"""`tidal image convert` straight from a registry: an ordinary OCI image pushed with skopeo
(an independent client) becomes a Tidal image, pushed back, pulled lazily and mounted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.image.oci import TIDAL_LAYER_MEDIA_TYPE
from tidal.testing.oci_images import make_oci_image, skopeo, write_oci_layout
from tidal.testing.registry_server import RegistryServer

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop, pytest.mark.registry]


def _tidal(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_convert_reads_a_registry_image_and_pushes_the_result(
    registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(tmp_path / "chunks"))
    files = {"etc/motd": b"converted from a registry\n", "data/blob.bin": os.urandom(1 << 20)}
    plain = make_oci_image(files)
    write_oci_layout(tmp_path / "layout", plain, "v1")
    src = f"{registry.address}/plain/app:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1", f"docker://{src}")

    dest = f"{registry.address}/tidal/app:v1"
    out = _tidal("image", "convert", f"docker://{src}", "-o", str(tmp_path / "img"), "--push", dest)
    assert "pushed" in out.stdout
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}"))
    assert [la["mediaType"] for la in raw["layers"]] == [TIDAL_LAYER_MEDIA_TYPE]
    assert not list((tmp_path / "data").glob("tmp/fetch-*"))  # the download was cleaned up

    _tidal("image", "pull", dest, str(tmp_path / "pulled"))
    target = tmp_path / "mnt"
    _tidal("image", "mount", str(tmp_path / "pulled"), str(target))
    try:
        for name, data in files.items():
            assert (target / name).read_bytes() == data
    finally:
        _tidal("image", "umount", "--force", str(target))


def test_convert_of_a_missing_registry_image_is_one_clear_line(
    registry: RegistryServer, tmp_path: Path
) -> None:
    proc = _tidal(
        "image", "convert", f"docker://{registry.address}/nope/app:v1", "-o", str(tmp_path / "x"),
        ok=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "nope/app" in proc.stderr
