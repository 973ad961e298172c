"""Pure helpers: mount table parsing, mkfs arguments, disk sizing, mount records."""

from __future__ import annotations

from pathlib import Path

from tidal.blockdev.builder import choose_inodes, choose_size
from tidal.blockdev.ext4 import Ext4Format, mkfs_command, mount_points
from tidal.blockdev.mounts import MountInfo, mount_key
from tidal.blockdev.settings import BlockdevSettings
from tidal.units import MiB

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 7:0 / /srv/with\\040space rw - ext4 /dev/loop0 ro
41 22 0:50 / /var/lib/tidal/mounts/ab/fuse rw,nosuid - fuse.tidal-blockdev tidal:/img rw,user_id=0
"""


def test_mount_points_unescapes_and_reads_type_and_source(tmp_path: Path) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(MOUNTINFO)
    table = mount_points(f)
    assert table["/srv/with space"] == ("ext4", "/dev/loop0")
    assert table["/var/lib/tidal/mounts/ab/fuse"] == ("fuse.tidal-blockdev", "tidal:/img")
    assert set(table) == {"/", "/srv/with space", "/var/lib/tidal/mounts/ab/fuse"}


def test_mkfs_never_writes_the_whole_disk_and_honours_the_format() -> None:
    cmd = mkfs_command("/dev/loop7", Ext4Format(inode_count=5000, journal=False))
    assert cmd[0] == "mkfs.ext4" and cmd[-1] == "/dev/loop7"
    ext = cmd[cmd.index("-E") + 1]
    assert {"lazy_itable_init=1", "lazy_journal_init=1", "nodiscard"} <= set(ext.split(","))
    assert cmd[cmd.index("-O") + 1] == "^has_journal"
    assert cmd[cmd.index("-N") + 1] == "5000"
    assert "-O" not in mkfs_command("/dev/loop7", Ext4Format(journal=True))


def test_size_is_generous_aligned_and_at_least_the_minimum() -> None:
    s = BlockdevSettings()
    assert choose_size(0, 0, s) == s.min_size_bytes
    big = choose_size(200 * MiB, 10_000, s)
    assert big % MiB == 0
    assert big >= 2 * (200 * MiB + 10_000 * 4096) + s.slack_bytes
    custom = BlockdevSettings(size_factor=3.0, slack_bytes=0, min_size_bytes=MiB)
    assert choose_size(10 * MiB, 0, custom) == 30 * MiB


def test_inodes_cover_every_entry_twice() -> None:
    s = BlockdevSettings()
    assert choose_inodes(100_000, 64 * MiB, s) >= 200_000
    assert choose_inodes(0, 64 * MiB, s) == 64 * MiB // s.bytes_per_inode


def test_mount_record_round_trips_and_keys_are_stable() -> None:
    info = MountInfo("/mnt/a", "/img", None, True, "/run/x/fuse", 42, "/dev/loop3", 1.5, "k")
    assert MountInfo.from_json(info.to_json()) == info
    assert info.disk_file == "/run/x/fuse/disk" and info.log_file == Path("/run/x/server.log")
    assert mount_key(Path("/mnt/a")) == mount_key(Path("/mnt/a")) != mount_key(Path("/mnt/b"))
