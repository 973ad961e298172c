"""[blockdev] loop_read_ahead_kb: the read-ahead ext4 gets on an image's loop device (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image
from tidal.blockdev import loop, mounts
from tidal.blockdev.settings import BlockdevSettings
from tidal.errors import MountError

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop]


@pytest.mark.parametrize("read_ahead_kb", [None, 0, 512])
def test_a_mount_gets_the_configured_read_ahead(tmp_path: Path, read_ahead_kb: int | None) -> None:
    image = build_sample_image(tmp_path, {"/data/file": b"x" * 300_000})
    info = mounts.mount_image(
        image, tmp_path / "mnt", settings=BlockdevSettings(loop_read_ahead_kb=read_ahead_kb)
    )
    try:
        assert info.loop_device is not None
        got = loop.read_ahead_kb(info.loop_device)
        if read_ahead_kb is None:  # the kernel's own choice (2560 KiB for loop on 6.x)
            assert got >= 128
        else:
            assert got == read_ahead_kb
        assert (tmp_path / "mnt" / "data" / "file").read_bytes() == b"x" * 300_000
    finally:
        mounts.unmount(tmp_path / "mnt")


def test_read_ahead_of_a_device_that_is_not_there_is_one_line() -> None:
    with pytest.raises(MountError, match="setting read-ahead of /dev/loop-nonexistent"):
        loop.set_read_ahead("/dev/loop-nonexistent", 64)
