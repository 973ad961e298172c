"""HostMounter against the real kernel: an overlay by mount(2), read back through the mount
table, and a bad plan's one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidal.engine.mounter import HostMounter
from tidal.engine.state import overlay_mount
from tidal.errors import EngineError


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
