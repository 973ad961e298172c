"""A Tidal image directory whose manifest.json is hostile: every command refuses in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.errors import FormatError
from tidal.image.manifest import MANIFEST_FORMAT, Image

LAYER = {
    "digest": "sha256:" + "a" * 64,
    "size_bytes": 4096,
    "raw_data_bytes": 0,
    "extent_count": 0,
    "codec": "lz4",
    "chunk_size_bytes": 65536,
    "tail_crc32": 0,
}


def _manifest(**layer: object) -> bytes:
    doc = {"format": MANIFEST_FORMAT, "size_bytes": 1 << 20, "layers": [{**LAYER, **layer}]}
    return json.dumps(doc).encode()


MANIFESTS = {
    "non-UTF-8": (b'{"format": "\xff\xfe"}', "not UTF-8"),
    "unknown layer kind": (_manifest(kind="zfile-v9"), "unknown kind 'zfile-v9'"),
    "a list": (b"[1, 2]", "expected a JSON object"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "manifest.json"),
    "layer without digest": (
        json.dumps(
            {"format": MANIFEST_FORMAT, "size_bytes": 1, "layers": [{"kind": "data"}]}
        ).encode(),
        "malformed manifest",
    ),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_open_refuses(tmp_path: Path, case: str) -> None:
    data, says = MANIFESTS[case]
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(FormatError, match=says):
        Image.open(tmp_path)


@pytest.mark.parametrize("command", ["verify", "export-raw", "inspect"])
@pytest.mark.parametrize("case", ["non-UTF-8", "unknown layer kind"])
def test_commands_refuse_in_one_line(tmp_path: Path, command: str, case: str) -> None:
    data, says = MANIFESTS[case]
    img = tmp_path / "img"
    img.mkdir()
    (img / "manifest.json").write_bytes(data)
    argv = [sys.executable, "-m", "tidal.cli.main", "image", command, str(img)]
    if command == "export-raw":
        argv.append(str(tmp_path / "disk.raw"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr.replace("\n", " "), proc.stderr
    assert not (tmp_path / "disk.raw").exists()
