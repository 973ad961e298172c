"""Containers run by registry reference (real runc, FUSE, loop, ext4 and the CNCF registry).

``tidal run REF`` resolves the reference through the node's image store at the daemon,
pulling what is missing; the mounted root is exactly the image's tree (no ``/lost+found``);
``--pull never`` with the image absent is one error and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.blobs.distribution import push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blockdev.builder import build_from_dir
from tidal.engine.client import EngineClient
from tidal.engine.containers import IMAGE_REFERENCE_LABEL, Engine
from tidal.engine.daemon import Daemon
from tidal.engine.spec import ContainerSpec
from tidal.errors import ImageReferenceNotFoundError
from tidal.image.manifest import EXACT_ROOT_ANNOTATION
from tidal.node.images import ImageStore
from tidal.testing.registry_server import RegistryServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.loop,
    pytest.mark.fuse,
    pytest.mark.registry,
]


@pytest.fixture(autouse=True)
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's data root (store, chunk cache, mount records) under ``tmp_path``; autouse,
    so it is set before the engine or daemon fixture starts and stays until they are torn
    down (their close releases hot image mounts, which are recorded there)."""
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(tmp_path / "data"))


@pytest.fixture
def pushed(busybox_rootfs: Path, tmp_path: Path) -> Iterator[tuple[str, RegistryServer]]:
    """A busybox image built by this builder (so without /lost+found), in a registry."""
    image = build_from_dir(busybox_rootfs, tmp_path / "busybox").image_dir
    with RegistryServer(access_log=True) as server, RegistryClient(server.address) as client:
        ref = f"{server.address}/engine/busybox:v1"
        push_image(image, ImageReference.parse(ref), client)
        yield ref, server


def _run_ls(engine: Engine, spec: ContainerSpec) -> list[str]:
    rec = engine.run(spec)
    try:
        rec = engine.wait(rec.id, 30)
        assert rec.status == "exited" and rec.exit_code == 0, (rec, engine.log_tail(rec.id))
        return engine.logs(rec.id).data.decode().split()
    finally:
        with contextlib.suppress(Exception):
            engine.remove(rec.id, force=True)


def test_run_by_reference_pulls_once_and_the_root_is_exactly_the_tree(
    engine: Engine, pushed: tuple[str, RegistryServer], busybox_rootfs: Path
) -> None:
    ref, server = pushed
    listing = _run_ls(engine, ContainerSpec(image=ref, command=("ls", "-a", "/")))
    assert "lost+found" not in listing
    # the image's own entries, plus what the engine mounts over an empty root
    expected = set(os.listdir(busybox_rootfs)) | {".", "..", "proc", "sys", "dev", "etc", "tmp"}
    assert set(listing) <= expected and set(os.listdir(busybox_rootfs)) <= set(listing)
    stored = ImageStore().get(ref)
    manifests = sum(1 for m, p, _ in server.requests() if "/manifests/" in p and m == "GET")
    # again: the store has it (missing), so no manifest is fetched; the label keeps the ref
    rec = engine.create(ContainerSpec(image=ref, command=("true",)))
    try:
        assert rec.spec.image == str(stored.path)
        assert dict(rec.spec.labels)[IMAGE_REFERENCE_LABEL] == ref
    finally:
        engine.remove(rec.id, force=True)
    assert sum(1 for m, p, _ in server.requests() if "/manifests/" in p and m == "GET") == manifests


def test_pull_never_without_the_image_is_one_error_through_the_daemon(
    daemon: tuple[Daemon, EngineClient], pushed: tuple[str, RegistryServer]
) -> None:
    _, client = daemon
    ref, _ = pushed
    with pytest.raises(ImageReferenceNotFoundError, match="--pull never forbids pulling"):
        client.run(ContainerSpec(image=ref, pull="never", command=("true",)))
    assert client.list_all() == []
    assert ImageStore().list() == []
    rec = client.run(ContainerSpec(image=ref, pull="always", command=("true",)))
    try:
        assert client.wait(rec.id, 30).exit_code == 0
        assert [i.reference for i in ImageStore().list()] == [ref]
    finally:
        client.remove(rec.id, force=True)


def test_images_shows_users_and_rmi_refuses_while_a_container_uses_the_image(
    engine: Engine, pushed: tuple[str, RegistryServer], tmp_path: Path
) -> None:
    ref, _ = pushed
    env = {
        **os.environ,
        "TIDAL_ENGINE__STATE_DIR": str(engine.state_dir),
        "TIDAL_BLOBS__CACHE_DIR": str(tmp_path / "chunks"),
    }

    def tidal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    rec = engine.create(ContainerSpec(image=ref, name="uses-it", command=("true",)))
    try:
        (row,) = json.loads(tidal("images", "--json").stdout)
        assert row["reference"] == ref and row["used_by"] == ["uses-it"]
        refused = tidal("rmi", ref)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "is used by container(s) uses-it" in refused.stderr
        assert ImageStore().get(ref).path.is_dir()
    finally:
        engine.remove(rec.id, force=True)
    lower = Path(rec.rootfs.layer.lower_mountpoint) if rec.rootfs.layer else None
    assert lower is not None and lower.is_mount()  # hot: the engine's image cache
    removed = tidal("rmi", ref)
    assert removed.returncode == 0, removed.stderr
    assert ImageStore().list() == []
    assert not lower.is_mount()  # rmi released the hot mount of the image it removed
    assert engine.storage.trim_hot_images(keep=0) == [str(lower)]  # a stale entry: harmless


def test_an_image_built_before_exact_roots_does_not_show_its_lost_and_found(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(tmp_path / "data"))
    tree = tmp_path / "tree"
    shutil.copytree(busybox_rootfs, tree, symlinks=True)
    (tree / "lost+found").mkdir()  # the tree's own: an exact image shows it
    exact = build_from_dir(tree, tmp_path / "exact").image_dir
    assert "lost+found" in _run_ls(engine, ContainerSpec(image=str(exact), command=("ls", "/")))
    # what the builder wrote before: mkfs's /lost+found and no exact-root annotation
    old = tmp_path / "old"
    shutil.copytree(exact, old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["annotations"][EXACT_ROOT_ANNOTATION]
    (old / "manifest.json").write_text(json.dumps(doc))
    assert "lost+found" not in _run_ls(engine, ContainerSpec(image=str(old), command=("ls", "/")))
