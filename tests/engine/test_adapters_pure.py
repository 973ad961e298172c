"""Pure tests of the thin adapters' logic: runtime argv and messages, monitor helpers,
hybrid-cgroup detection, image configs, quota mkfs arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidal.engine.hostprep import v2_controllers_in_hybrid
from tidal.engine.monitor import ExitRecord, read_exit_record
from tidal.engine.rootfs import (
    DirectoryRootfsProvider,
    ImageConfig,
    TidalImageRootfsProvider,
    overlay_options,
    provider_for,
)
from tidal.engine.runtime import _clean, read_runtime_log
from tidal.engine.volume import mkfs_argv
from tidal.errors import ImageNotFoundError
from tidal.fsutil import write_json_atomic
from tidal.testing.cgroups import FakeCgroupV1Fs, FakeCgroupV2Fs


def test_runtime_messages_are_one_readable_line(tmp_path: Path) -> None:
    raw = b'{"level":"error","msg":"container_linux.go: starting container process caused: exec: \\"x\\": not found"}\n'
    assert (
        _clean(raw) == 'container_linux.go: starting container process caused: exec: "x": not found'
    )
    assert _clean(b"crun: plain text error\n") == "crun: plain text error"
    log = tmp_path / "runtime.log"
    log.write_text(
        json.dumps({"level": "debug", "msg": "noise"})
        + "\n"
        + json.dumps({"level": "error", "msg": "boom"})
        + "\n"
    )
    assert read_runtime_log(log) == "boom"
    assert read_runtime_log(tmp_path / "missing.log") == ""


def test_oom_counter_v1_and_v2(tmp_path: Path) -> None:
    v1fs = FakeCgroupV1Fs(tmp_path / "v1")
    v1fs.create("tidal/c1")
    v1 = v1fs.memory_events_file("tidal/c1")
    assert v1.name == "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    v2fs = FakeCgroupV2Fs(tmp_path / "v2")
    v2fs.create("tidal/c1")
    v2 = v2fs.memory_events_file("tidal/c1")
    assert v2.name == "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n")
    assert v1fs.oom_kills("tidal/c1") == 2
    assert v2fs.oom_kills("tidal/c1") == 1
    assert v1fs.oom_kills("tidal/none") == 0
    assert v2fs.oom_kills("tidal/none") == 0


def test_exit_record_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "exit.json"
    rec = ExitRecord(exit_code=3, signal=None, oom_killed=False, finished_at=1.0, pid=7)
    write_json_atomic(path, rec.to_json())
    assert ExitRecord.from_json(json.loads(path.read_text())) == rec
    assert read_exit_record(tmp_path) == rec
    assert [p.name for p in tmp_path.iterdir()] == ["exit.json"]  # no temporary left


def test_hybrid_detection(tmp_path: Path) -> None:
    assert v2_controllers_in_hybrid(tmp_path) == []  # no unified mount: pure v1 or v2
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    assert v2_controllers_in_hybrid(tmp_path) == ["hugetlb"]


def test_image_config_and_provider_choice(tmp_path: Path) -> None:
    cfg = ImageConfig.from_oci(
        {
            "Entrypoint": ["/app"],
            "Cmd": ["--port", "80"],
            "Env": ["A=1", "B=x=y"],
            "WorkingDir": "/srv",
        }
    )
    assert cfg.default_command == ("/app", "--port", "80")
    assert cfg.env == (("A", "1"), ("B", "x=y"))
    assert cfg.workdir == "/srv"
    assert ImageConfig.from_oci({}).default_command == ()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    assert isinstance(provider_for(str(rootfs)), DirectoryRootfsProvider)
    (tmp_path / "rootfs.config.json").write_text(json.dumps({"config": {"Cmd": ["sh"]}}))
    assert DirectoryRootfsProvider().image_config(str(rootfs)).cmd == ("sh",)
    image = tmp_path / "img"
    image.mkdir()
    (image / "manifest.json").write_text("{}")
    assert isinstance(provider_for(str(image)), TidalImageRootfsProvider)
    with pytest.raises(ImageNotFoundError, match="tidal image build"):
        provider_for(str(tmp_path / "missing"))


def test_quota_volume_mkfs_limits_inodes_and_reserves_nothing() -> None:
    argv = mkfs_argv("/v.img", 64 << 20, 1000)
    assert argv[0] == "mkfs.ext4"
    assert argv[argv.index("-N") + 1] == "1000"
    assert argv[argv.index("-m") + 1] == "0"
    assert argv[-1] == f"{(64 << 20) // 1024}k"
    assert (
        mkfs_argv("/v.img", 64 << 20, 3)[mkfs_argv("/v.img", 64 << 20, 3).index("-N") + 1] == "64"
    )
    assert (
        overlay_options(Path("/l"), Path("/u"), Path("/w")) == "lowerdir=/l,upperdir=/u,workdir=/w"
    )


def test_volume_pool_refill_and_take(tmp_path: Path) -> None:
    import shutil

    from tidal.engine.volume import VolumePool

    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    pool = VolumePool(tmp_path / "pool", 16 << 20, 256, target=2)
    assert pool.matches(16 << 20, 256) and not pool.matches(32 << 20, 256)
    assert not pool.take(tmp_path / "none.img")
    assert pool.refill() == 2
    assert pool.refill() == 0
    assert pool.take(tmp_path / "a.img")
    assert (tmp_path / "a.img").stat().st_size == 16 << 20
    assert len(pool.ready()) == 1
    assert pool.refill() == 1
    assert not VolumePool(tmp_path / "p2", 16 << 20, 256, target=0).matches(16 << 20, 256)


@pytest.mark.root
@pytest.mark.loop
def test_volumes_from_a_template_are_separate_sparse_filesystems(tmp_path: Path) -> None:
    """A quota volume copied from its shape's template mounts as a filesystem of the asked
    size and inode count, holds only metadata on disk, and shares nothing with its twin."""
    import os

    from tidal.engine.mounter import HostMounter
    from tidal.engine.volume import VolumeTemplates, create_volume, destroy_volume

    mounter = HostMounter()
    templates = VolumeTemplates(tmp_path / "templates", mounter)
    vols = []
    try:
        for name in ("a", "b"):
            vols.append(
                create_volume(
                    mounter, tmp_path / f"{name}.img", tmp_path / name, 64 << 20, 512, templates
                )
            )
        assert len(list((tmp_path / "templates").glob("*.img"))) == 1  # one mkfs for both
        for v in vols:
            st = os.statvfs(v.mountpoint)
            assert st.f_files == 512 and st.f_blocks * st.f_frsize > 56 << 20
            assert Path(v.image_path).stat().st_blocks * 512 < 8 << 20
        (tmp_path / "a" / "only-in-a").write_text("a\n")
        assert not (tmp_path / "b" / "only-in-a").exists()
    finally:
        for v in vols:
            destroy_volume(mounter, v)
    assert not any(mounter.mounted(str(tmp_path / n)) for n in ("a", "b"))
    # a changed format is a different template
    assert templates.path(64 << 20, 512) != templates.path(64 << 20, 1024)


def test_records_before_read_only_roots_read_as_overlays() -> None:
    """A record written before ``readonly`` existed is an overlay root (the default)."""
    from tidal.engine.state import RootfsState

    old = {
        "kind": "dir", "image": "/img", "generation": 0, "lower_mountpoint": "/mp",
        "lower": "/img", "upper": "/c/layer/upper.0", "work": "/c/layer/work.0",
        "merged": "/c/rootfs", "volume": None, "volumes": [],
    }  # fmt: skip
    state = RootfsState.from_json(old)
    assert state.layer is not None and not state.layer.readonly
    assert state.layer.overlay.target == "/c/rootfs"
    assert RootfsState.from_json(state.to_json()) == state
