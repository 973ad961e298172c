"""The snapshotter's verbs with containerd's semantics, on a tmp root with a fake image backend
(no containerd, no root): ordinary layer chains, remote Tidal layers, crash recovery."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tidal.errors import (
    MountError,
    SnapshotArgumentError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from tidal.snapshotter.backend import PulledImage
from tidal.snapshotter.model import (
    SNAPSHOT_REF_LABEL,
    STARGZ_DIGEST_LABEL,
    STARGZ_REF_LABEL,
    TIDAL_LAYER_LABEL,
    Kind,
    Mount,
)
from tidal.snapshotter.snapshotter import Snapshotter

from .fakes import MARKER, FakeBackend

REF = "127.0.0.1:5000/tidal/app:v1"
IMAGE = PulledImage(REF, "sha256:" + "m" * 64, ("sha256:l1", "sha256:l2"))


def _labels(target: str, layer: str, ref: str = REF, tidal: bool = True) -> dict[str, str]:
    out = {SNAPSHOT_REF_LABEL: target, STARGZ_REF_LABEL: ref, STARGZ_DIGEST_LABEL: layer}
    if tidal:
        out[TIDAL_LAYER_LABEL] = "data"
    return out


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend({REF: IMAGE})


@pytest.fixture
def sn(tmp_path: Path, backend: FakeBackend) -> Snapshotter:
    s = Snapshotter(tmp_path / "root", backend)
    yield s  # type: ignore[misc]
    s.close()


def test_an_ordinary_layer_chain_as_containerd_unpacks_it(sn: Snapshotter) -> None:
    m = sn.prepare("default/1/extract-1", "", {"x": "1"})
    fs1 = sn.snapshot_dir(sn.stat("default/1/extract-1")) / "fs"
    assert m == [Mount("bind", str(fs1), ("rw", "rbind"))]
    (fs1 / "hello").write_bytes(b"x" * 10000)
    c1 = sn.commit("default/2/c1", "default/1/extract-1", {"containerd.io/snapshot.ref": "c1"})
    assert c1.kind == Kind.COMMITTED and c1.size_bytes >= 10000 and c1.inodes == 2
    with pytest.raises(SnapshotNotFoundError):
        sn.stat("default/1/extract-1")  # the active key is gone; the committed name remains
    m2 = sn.prepare("default/3/extract-2", "default/2/c1")
    snap2 = sn.stat("default/3/extract-2")
    d2 = sn.snapshot_dir(snap2)
    assert snap2.parent == "default/2/c1" and snap2.kind == Kind.ACTIVE
    assert m2 == [
        Mount("overlay", "overlay", (f"workdir={d2}/work", f"upperdir={d2}/fs", f"lowerdir={fs1}"))
    ]
    sn.commit("default/4/c2", "default/3/extract-2")
    v = sn.view("default/5/view", "default/4/c2")
    assert v[0].type == "overlay" and v[0].options == (f"lowerdir={d2}/fs:{fs1}",)
    assert sn.mounts("default/5/view") == v
    assert sn.usage("default/2/c1") == (c1.size_bytes, 2)
    assert [s.key for s in sn.walk(["kind==committed"])] == ["default/2/c1", "default/4/c2"]
    assert [s.key for s in sn.walk(['parent=="default/2/c1"'])] == ["default/4/c2"]


def test_containerds_errors(sn: Snapshotter) -> None:
    sn.prepare("a")
    with pytest.raises(SnapshotExistsError):
        sn.prepare("a")
    with pytest.raises(SnapshotNotFoundError, match="parent snapshot 'nope'"):
        sn.prepare("b", "nope")
    with pytest.raises(SnapshotStateError, match="not committed"):
        sn.prepare("b", "a")
    with pytest.raises(SnapshotStateError, match="committed; only active"):
        sn.commit("c", "a") and sn.mounts("c")
    sn.view("v", "c")
    with pytest.raises(SnapshotStateError, match="only an active snapshot can be committed"):
        sn.commit("v2", "v")
    sn.prepare("a2")
    with pytest.raises(SnapshotExistsError, match="'c' already exists"):
        sn.commit("c", "a2")
    with pytest.raises(SnapshotStateError, match="1 child"):
        sn.remove("c")
    sn.remove("v")
    sn.remove("c")
    with pytest.raises(SnapshotNotFoundError):
        sn.remove("c")
    with pytest.raises(SnapshotArgumentError):
        sn.prepare("big", "", {"k": "v" * 5000})
    with pytest.raises(SnapshotArgumentError):
        sn.update("a2", {}, ["kind"])
    assert sn.update("a2", {"n": "1"}, []).labels == {"n": "1"}
    assert sn.update("a2", {}, ["labels.n"]).labels == {}


def test_removed_snapshots_leave_no_directory(sn: Snapshotter) -> None:
    sn.prepare("a")
    d = sn.snapshot_dir(sn.stat("a"))
    assert d.is_dir()
    sn.remove("a")
    assert not d.exists() and list((sn.root / "snapshots").iterdir()) == []


def test_tidal_layers_are_committed_remotely_and_mounted_only_for_a_container(
    sn: Snapshotter, backend: FakeBackend
) -> None:
    with pytest.raises(SnapshotExistsError, match="served lazily"):
        sn.prepare("default/1/extract-1", "", _labels("c1", "sha256:l1"))
    with pytest.raises(SnapshotExistsError):
        sn.prepare("default/2/extract-2", "c1", _labels("c2", "sha256:l2"))
    assert backend.pulls == [REF, REF] and backend.mounted == {}
    c2 = sn.stat("c2")
    assert c2.kind == Kind.COMMITTED and c2.parent == "c1"
    assert c2.labels[SNAPSHOT_REF_LABEL] == "c2"  # what containerd's Walk checks
    assert c2.remote is not None and c2.remote.manifest_digest == IMAGE.manifest_digest
    with pytest.raises(SnapshotNotFoundError):
        sn.stat("default/1/extract-1")
    assert sn.walk([f'labels."{SNAPSHOT_REF_LABEL}"==c2,parent=="c1"']) == [c2]
    # pulling again: the target exists, still "already exists", no second record
    with pytest.raises(SnapshotExistsError, match="target snapshot 'c1'"):
        sn.prepare("default/3/extract-1", "", _labels("c1", "sha256:l1"))

    m = sn.prepare("default/9/ctr1", "c2")
    d = sn.snapshot_dir(sn.stat("default/9/ctr1"))
    img = sn.image_target(c2.remote)
    assert m == [
        Mount("overlay", "overlay", (f"workdir={d}/work", f"upperdir={d}/fs", f"lowerdir={img}"))
    ]
    assert (img / MARKER).read_text() == IMAGE.manifest_digest
    # a second container and a view share the one mount (the fake refuses a second)
    m2 = sn.prepare("default/11/ctr2", "c2")
    assert m2[0].options[-1] == f"lowerdir={img}"
    v = sn.view("default/10/view", "c2")
    vd = sn.snapshot_dir(sn.stat("default/10/view"))
    assert v == [Mount("bind", str(img), ("ro", "rbind"))]
    assert list(backend.mounted) == [img]
    sn.remove("default/9/ctr1")
    sn.remove("default/10/view")
    assert list(backend.mounted) == [img] and not d.exists() and not vd.exists()
    sn.remove("default/11/ctr2")  # the last user: now it goes
    assert backend.mounted == {} and not img.exists()
    with pytest.raises(SnapshotStateError):
        sn.remove("c1")  # c2 still sits on it
    sn.remove("c2")
    sn.remove("c1")
    assert sn.walk() == []


def test_a_layer_the_image_lacks_or_without_marker_is_applied_as_usual(
    sn: Snapshotter, backend: FakeBackend
) -> None:
    m = sn.prepare("k1", "", _labels("c1", "sha256:other"))
    assert m[0].type == "bind" and sn.stat("k1").kind == Kind.ACTIVE
    m = sn.prepare("k2", "", _labels("c9", "sha256:l1", tidal=False))
    assert m[0].type == "bind" and backend.pulls == [REF]


def test_an_image_that_cannot_be_pulled_fails_the_prepare_in_one_line(sn: Snapshotter) -> None:
    with pytest.raises(SnapshotError, match=r"could not be pulled: image reg/x:1 is not in"):
        sn.prepare("k", "", _labels("c1", "sha256:l1", ref="reg/x:1"))
    assert sn.walk() == []


def test_restart_remounts_recorded_mounts_and_cleanup_removes_orphans(
    tmp_path: Path, backend: FakeBackend
) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root, backend)
    with pytest.raises(SnapshotExistsError):
        sn.prepare("x", "", _labels("c1", "sha256:l1"))
    sn.prepare("ctr", "c1")
    remote = sn.stat("c1").remote
    assert remote is not None
    target = sn.image_target(remote)
    sn.close()
    backend.mounted.clear()  # the node rebooted, or the FUSE server died with the service
    (target / MARKER).unlink()
    orphan = root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)  # a crash between mkdir and the row's commit
    stale = root / "images" / "ab12"
    stale.mkdir()  # an image dir whose last user's row went before its unmount
    backend.mount(remote, stale)

    sn2 = Snapshotter(root, backend)
    assert sn2.reconcile() == ["ctr"]
    assert backend.is_mounted(target) and sn2.reconcile() == []
    assert sn2.cleanup() == [str(orphan), str(stale)] and not orphan.exists()
    assert stale not in backend.mounted and target in backend.mounted
    assert sn2.stat("ctr").kind == Kind.ACTIVE
    sn2.remove("ctr")
    assert not backend.mounted
    sn2.close()


def test_a_failed_mount_leaves_no_row_and_no_directory(
    sn: Snapshotter, backend: FakeBackend
) -> None:
    with pytest.raises(SnapshotExistsError):
        sn.prepare("x", "", _labels("c1", "sha256:l1"))
    backend.mount_error = MountError("loop device: none free")
    with pytest.raises(MountError, match="none free"):
        sn.prepare("ctr", "c1")
    with pytest.raises(SnapshotNotFoundError):
        sn.stat("ctr")
    assert [d.name for d in (sn.root / "snapshots").iterdir()] == []
    backend.mount_error = None
    assert sn.prepare("ctr", "c1")[0].type == "overlay"  # and the next try mounts


def test_other_calls_are_answered_while_an_image_mounts(
    sn: Snapshotter, backend: FakeBackend
) -> None:
    with pytest.raises(SnapshotExistsError):
        sn.prepare("x", "", _labels("c1", "sha256:l1"))
    backend.mount_gate = threading.Event()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(sn.prepare("ctr", "c1")))
    t.start()
    try:
        assert backend.mount_started.wait(5)
        assert sn.stat("c1").kind == Kind.COMMITTED  # not held up by the mount in progress
        sn.prepare("other")
        assert sn.walk(["kind==active"])[0].key == "ctr"
    finally:
        backend.mount_gate.set()
        t.join(10)
    assert result and result[0][0].type == "overlay"  # type: ignore[index]


def test_a_tidal_layer_without_reference_fails_before_containerd_downloads_it(
    sn: Snapshotter, backend: FakeBackend
) -> None:
    labels = {SNAPSHOT_REF_LABEL: "c1", TIDAL_LAYER_LABEL: "data"}
    with pytest.raises(SnapshotStateError, match="ctr-remote images rpull --snapshotter tidal"):
        sn.prepare("default/1/extract", "", labels)
    assert sn.walk() == [] and backend.pulls == []
