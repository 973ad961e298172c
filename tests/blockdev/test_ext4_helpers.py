"""blockdev.ext4's helpers on a real file: what the engine's quota volumes use (mkfs of a
file with a fixed inode count, ``mount -o loop``, unmount that falls back to lazy when busy)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidal.blockdev import ext4
from tidal.blockdev.ext4 import Ext4Format, mkfs_command
from tidal.errors import MountError, QuotaError
from tidal.units import MiB


def test_mkfs_command_sizes_a_file_when_asked() -> None:
    cmd = mkfs_command("/v.img", Ext4Format(inode_count=64, journal=True), size_bytes=32 * MiB)
    assert cmd[-2:] == ["/v.img", "32768k"]
    assert "-O" not in cmd and cmd[cmd.index("-N") + 1] == "64"


def test_helpers_raise_the_callers_error_class(tmp_path: Path) -> None:
    with pytest.raises(QuotaError, match=r"^formatting .*/missing/v.img as ext4: "):
        ext4.mkfs(tmp_path / "missing" / "v.img", Ext4Format(), error=QuotaError)


@pytest.mark.root
@pytest.mark.loop
def test_file_volume_mount_and_busy_unmount_falls_back_to_lazy(tmp_path: Path) -> None:
    image, target = tmp_path / "v.img", tmp_path / "mnt"
    target.mkdir()
    with image.open("wb") as fh:
        fh.truncate(32 * MiB)
    ext4.mkfs(image, Ext4Format(inode_count=128, journal=True, label="t"), error=QuotaError)
    ext4.mount(image, target, readonly=False, options="loop,noatime")
    try:
        assert ext4.is_mountpoint(target)
        assert os.statvfs(target).f_files == 128
        busy = os.open(target, os.O_RDONLY)  # an open directory keeps the mount busy
        try:
            with pytest.raises(MountError, match=r"^unmounting .*/mnt: .*busy"):
                ext4.umount(target)
            ext4.umount(target, lazy_fallback=True)
            assert not ext4.is_mountpoint(target)
        finally:
            os.close(busy)
    finally:
        if ext4.is_mountpoint(target):
            ext4.umount(target, lazy=True)
