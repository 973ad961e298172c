"""``tidal snapshotter serve``: bad input and a missing extra are one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCK_GRPC = """
import sys


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "grpc":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


def _tidal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("tidal"))
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_root_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    res = _tidal("snapshotter", "serve", "--socket", str(tmp_path / "s.sock"), "--root", str(afile))
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: --root {afile} is not a directory"


def test_without_grpc_it_names_the_extra(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_GRPC)
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "300"}
    res = _tidal("snapshotter", "serve", "--root", str(tmp_path / "r"), env=env)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "error: this command needs grpc, which is not installed; it comes with Tidal's "
        "'snapshotter' extra: pip install 'tidal[snapshotter]'"
    )
    assert _tidal("snapshotter", "serve", "--help", env=env).returncode == 0
