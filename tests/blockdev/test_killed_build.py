"""A convert SIGKILLed mid-layer: its FUSE server exits by itself and gc cleans the rest.

Real FUSE, loop and ext4. Before owners were recorded, the server (in its own session) served
on forever and ``tidal image gc`` answered "nothing to clean" over a live mount and loop device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockdev.conftest import leaked
from tidal.blockdev import loop, mounts
from tidal.testing.oci_builder import LayerTar, write_oci_layout

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop]


def _big_layout(root: Path) -> Path:
    layer = LayerTar()
    for i in range(48):
        layer.add_raw(f"data/f{i:02}.bin", data=os.urandom(4 << 20))
    write_oci_layout(root, [layer.bytes()], compress=[False])
    return root


def test_a_killed_convert_leaves_no_server_and_gc_cleans_up(
    tmp_path: Path, data_root: Path
) -> None:
    src = _big_layout(tmp_path / "oci")
    env = {**os.environ, "TIDAL_DATA_ROOT": str(data_root)}
    convert = subprocess.Popen(
        [sys.executable, "-m", "tidal.cli.main", "image", "convert", str(src), "-o",
         str(tmp_path / "img")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    records: list[mounts.MountInfo] = []
    while not records:  # the build's writable mount is up: the layer is being written
        assert convert.poll() is None, "convert finished before it could be killed"
        assert time.monotonic() < deadline, "the build never mounted"
        records = [m for m in mounts.list_mounts() if m.loop_device]
        time.sleep(0.05)
    time.sleep(0.5)
    info = records[0]
    assert info.owner is not None and info.owner.startswith(f"{convert.pid}:")
    convert.send_signal(signal.SIGKILL)
    convert.wait()

    deadline = time.monotonic() + 20
    while mounts.server_alive(info):
        assert time.monotonic() < deadline, "the build's FUSE server outlived its owner"
        time.sleep(0.1)
    assert leaked(tmp_path), "expected the dead build's mount and loop device to be left"
    gc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", "gc"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr
    assert "nothing to clean" not in gc.stdout + gc.stderr
    assert leaked(tmp_path) == []
    assert mounts.list_mounts() == []
    # the loop device by its backing file's identity: once the FUSE server is gone its path
    # shows as "/disk", which a by-path check (leaked()) cannot see
    assert info.loop_backing_id
    assert all(d.backing_id != info.loop_backing_id for d in loop.list_devices())
