"""The rich-mode init is built once per source, also when a pod's containers ask for it at
the same moment (the virtual node's two-container pods did: one build's rename failed)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tidal.engine.richinit import init_binary

pytestmark = pytest.mark.runtime


def test_concurrent_builds_in_one_process_all_get_the_init(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian package gcc)")
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: init_binary(tmp_path), range(2)))
    assert len(set(paths)) == 1 and paths[0].is_file()
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temporary file left
