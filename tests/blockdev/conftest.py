"""Fixtures for block device tests: a private data root and a leak check after each test.

Every test here gets ``TIDAL_DATA_ROOT`` under its ``tmp_path``. After a test that may have
mounted something, every recorded mount is torn down (in ``finally``), and the test FAILS if
a loop device or a mount under its ``tmp_path`` was still there: cleaning up is part of the
behaviour under test.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tidal.blockdev import ext4, loop, mounts
from tidal.blockdev.builder import build_from_dir
from tidal.cli.demo import make_sample_rootfs
from tidal.errors import TidalError


def build_sample_image(work: Path, files: Mapping[str, bytes]) -> Path:
    """The demo's busybox tree plus ``files`` (paths inside the image), as a one-layer image
    in ``work/image`` (built with a data root of its own under ``work``)."""
    root = work / "root"
    make_sample_rootfs(root)
    for rel, data in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_DATA_ROOT", str(work / "data"))
        return build_from_dir(root, work / "image").image_dir


def leaked(under: Path) -> list[str]:
    """Mounts and loop devices below ``under`` (by path prefix)."""
    prefix = str(under) + "/"
    found = [f"mount {p}" for p in ext4.mount_points() if p.startswith(prefix)]
    if Path("/dev/loop-control").exists():
        found += [
            f"loop {d.device} -> {d.backing_file}"
            for d in loop.list_devices()
            if d.backing_file.startswith(prefix)
        ]
    return found


@pytest.fixture(autouse=True)
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "data"
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(root))
    try:
        yield root
    finally:
        before = leaked(tmp_path)
        for m in mounts.list_mounts():
            with contextlib.suppress(TidalError):
                mounts.unmount(m.target, force=True)
        for entry in leaked(tmp_path):  # last resort, so one failure does not poison the rest
            kind, _, rest = entry.partition(" ")
            if kind == "mount":
                subprocess.run(["umount", "-l", rest], check=False, capture_output=True)
            else:
                subprocess.run(["losetup", "-d", rest.split()[0]], check=False)
        assert not before, f"test left mounts or loop devices behind: {before}"
