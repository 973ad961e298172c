"""HostMounter against the real kernel: an overlay and a loop-mounted quota volume by mount(2),
read back through the mount table and sysfs, and a bad plan's one-line error."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from tidal import proc
from tidal.blockdev import ext4
from tidal.engine.mounter import HostMounter
from tidal.engine.state import QuotaVolume, overlay_mount
from tidal.errors import EngineError, QuotaError


@pytest.mark.root
def test_overlay_mounts_merged_and_unmounts(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    lower, upper, work, target = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, target):
        d.mkdir()
    (lower / "from-lower").write_text("image\n")
    m = overlay_mount(str(lower), str(upper), str(work), str(target))
    mounter = HostMounter()
    assert mounter.apply([m]) == [m]
    try:
        assert mounter.mounted(str(target))
        assert (target / "from-lower").read_text() == "image\n"
        (target / "written").write_text("upper\n")
        assert (upper / "written").read_text() == "upper\n"  # writes land in the upper dir
        assert not (lower / "written").exists()
    finally:
        mounter.release([m])
    assert not mounter.mounted(str(target))


@pytest.mark.root
def test_a_bad_overlay_plan_is_one_line_naming_the_target(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    target = tmp_path / "merged"
    target.mkdir()
    m = overlay_mount(str(tmp_path / "missing"), str(tmp_path), str(tmp_path), str(target))
    with pytest.raises(EngineError) as info:
        HostMounter().apply([m])
    msg = str(info.value)
    assert "\n" not in msg and f"overlay mount at {target} failed" in msg, msg
    assert "No such file or directory" in msg, msg
    assert not HostMounter().mounted(str(target))


def _loops_of(path: Path) -> list[str]:
    """Loop devices bound to ``path`` (sysfs: what losetup reads)."""
    out = []
    for d in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            if (d / "loop" / "backing_file").read_text().strip() == str(path):
                out.append(d.name)
    return out


def _loops_left(path: Path, timeout_s: float = 5.0) -> list[str]:
    """Loop devices still bound to ``path`` once autoclear (run as the last reference goes)
    has had ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _loops_of(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _loops_of(path)


def _mounted_volume(tmp_path: Path) -> tuple[Path, Path, QuotaVolume, HostMounter]:
    """A 16 MiB ext4 quota volume, loop-mounted by a HostMounter (skips without root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    image, target = tmp_path / "disk.img", tmp_path / "disk"
    with open(image, "wb") as fh:
        fh.truncate(16 << 20)
    proc.run(["mkfs.ext4", "-q", "-F", str(image)], what="mkfs")
    vol = QuotaVolume(str(image), str(target), 16 << 20, 1024)
    mounter = HostMounter()
    mounter.apply([vol.mount])
    return image, target, vol, mounter


@pytest.mark.root
@pytest.mark.loop
def test_a_quota_volume_loop_mounts_and_its_device_goes_with_the_unmount(tmp_path: Path) -> None:
    image, target, vol, mounter = _mounted_volume(tmp_path)
    try:
        assert mounter.mounted(str(target))
        (loop,) = _loops_of(image)
        assert (Path("/sys/block") / loop / "loop" / "autoclear").read_text().strip() == "1"
        (target / "f").write_bytes(b"x" * 4096)
        with open("/proc/self/mountinfo") as fh:
            line = next(ln for ln in fh if f" {target} " in ln)
        assert "noatime" in line.split(" - ")[0] and " ext4 " in line, line
    finally:
        mounter.release([vol.mount])
    assert not mounter.mounted(str(target))
    assert _loops_left(image) == []


@pytest.mark.root
@pytest.mark.loop
def test_a_busy_volume_is_detached_and_its_device_goes_with_the_last_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unmount is umount2(2), no ``umount`` process (which reads the whole mount table
    first); a volume still in use is detached lazily, and its loop device is freed when the
    last open file on it closes."""
    image, target, vol, mounter = _mounted_volume(tmp_path)
    held = open(target / "open-file", "w")  # noqa: SIM115 - kept open across the unmount
    try:
        started: list[object] = []
        monkeypatch.setattr(proc, "run", lambda argv, **kw: started.append(argv))
        mounter.release([vol.mount])
        monkeypatch.undo()
        assert started == []
        assert not mounter.mounted(str(target))
        assert len(_loops_of(image)) == 1  # the open file still holds the device
        held.write("still writable\n")
    finally:
        held.close()
        monkeypatch.undo()
        if mounter.mounted(str(target)):  # a failed release leaves nothing behind
            proc.run(["umount", "-l", str(target)], what="cleaning up", check=False)
    assert _loops_left(image) == []


@pytest.mark.root
@pytest.mark.loop
def test_a_volume_that_is_not_ext4_is_one_line_and_leaves_no_loop_device(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    image, target = tmp_path / "junk.img", tmp_path / "disk"
    image.write_bytes(b"\0" * (4 << 20))
    vol = QuotaVolume(str(image), str(target), 4 << 20, 64)
    with pytest.raises(QuotaError) as info:
        HostMounter().apply([vol.mount])
    msg = str(info.value)
    assert "\n" not in msg and f"mounting quota volume {image} at {target}" in msg, msg
    assert not HostMounter().mounted(str(target))
    assert _loops_left(image) == []
    with pytest.raises(QuotaError, match="No such file"):
        HostMounter().apply([QuotaVolume(str(tmp_path / "none"), str(target), 1, 1).mount])


@pytest.mark.root
def test_the_sweep_finds_what_the_table_finds_without_entering_mounts(tmp_path: Path) -> None:
    """``mounts_under`` looks SWEEP_DEPTH levels deep by statx, not through the table: it
    must name every mount the engine can leave under a container's directory (rootfs, disk,
    volumes/N), deepest first, and not enter a mount's own tree."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    cdir = tmp_path / "c"
    targets = [cdir / "rootfs", cdir / "disk", cdir / "volumes" / "0"]
    for t in targets:
        t.mkdir(parents=True)
    (cdir / "layer" / "upper" / "deep").mkdir(parents=True)  # plain directories: not mounts
    made: list[Path] = []
    try:
        for t in targets:
            proc.run(["mount", "-t", "tmpfs", "tidal-test", str(t)], what="mount tmpfs")
            made.append(t)
        (cdir / "disk" / "inside").mkdir()
        proc.run(["mount", "-t", "tmpfs", "tidal-test", str(cdir / "disk" / "inside")], what="m")
        made.append(cdir / "disk" / "inside")
        found = HostMounter().mounts_under(cdir)
        table = sorted(ext4.mount_points_under(cdir), key=len, reverse=True)
        # the tree inside a mount is the mount's business: the sweep unmounts the mount
        assert set(found) == {str(t) for t in targets}, found
        assert set(table) - set(found) == {str(cdir / "disk" / "inside")}
        assert found == sorted(found, key=len, reverse=True)
    finally:
        for t in reversed(made):
            proc.run(["umount", str(t)], what="umount", check=False)
    assert HostMounter().mounts_under(cdir) == []
