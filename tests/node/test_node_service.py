"""The node service: one process serves every mount, and its mounts outlive it.

Real FUSE, loop devices and ext4, and the real ``tidal node serve`` in a subprocess. The crash
test is the issue's: SIGKILL the service while a process reads a large file from a mounted
image, start a new service, and the read completes with the right bytes (no EIO); a writable
layer's data written before the kill is still there; nothing leaks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image, leaked
from tidal.blockdev import mounts
from tidal.errors import MountError
from tidal.testing.node import NodeProcess

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop]

BIG = 96 << 20
"""Read in 1 MiB steps with a pause between them: the reader is still at it a second later."""


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeProcess]:
    data_root = tmp_path / "data"
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(data_root))
    n = NodeProcess(data_root)
    try:
        yield n
    finally:
        before = leaked(tmp_path)
        names = n.close()
        for entry in leaked(tmp_path):
            kind, _, rest = entry.partition(" ")
            if kind == "mount":
                subprocess.run(["umount", "-l", rest], check=False, capture_output=True)
            else:
                subprocess.run(["losetup", "-d", rest.split()[0]], check=False)
        assert not before, f"test left mounts or loop devices behind: {before}"
        assert not names, f"test left FUSE connections in the fd store: {names}"


def _serve_processes(under: Path) -> list[int]:
    """FUSE server processes (one per mount, the old way) serving something below ``under``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if b"tidal.blockdev.serve" in cmd and str(under).encode() in cmd:
                    found.append(int(d.name))
    return found


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_one_process_serves_every_mount(tmp_path: Path, node: NodeProcess) -> None:
    a = build_sample_image(tmp_path / "a", {"etc/which": b"image a\n"})
    b = build_sample_image(tmp_path / "b", {"etc/which": b"image b\n"})
    node.start()
    node.cli("image", "mount", str(a), str(tmp_path / "ma"))
    node.cli("image", "mount", str(b), str(tmp_path / "mb"), "--rw")
    assert _serve_processes(tmp_path) == [], "a mount started a FUSE server process"
    recs = {Path(m.target).name: m for m in mounts.list_mounts()}
    assert {m.server_pid for m in recs.values()} == {node.pid}
    assert all(m.fd_name for m in recs.values())
    assert (tmp_path / "ma/etc/which").read_bytes() == b"image a\n"
    (tmp_path / "mb/etc/which").write_bytes(b"changed\n")
    with node.client() as c:
        assert len(c.status()["serving"]) == 2
    listing = node.cli("image", "mounts").stdout
    assert listing.count("node service") == 2, listing
    node.cli("image", "umount", str(tmp_path / "ma"))
    node.cli("image", "umount", str(tmp_path / "mb"))
    assert mounts.list_mounts() == []
    # the writable layer kept what was written
    node.cli("image", "mount", str(b), str(tmp_path / "mb"), "--rw")
    assert (tmp_path / "mb/etc/which").read_bytes() == b"changed\n"
    node.cli("image", "umount", str(tmp_path / "mb"))


def test_a_sigkilled_service_resumes_and_the_reader_gets_every_byte(
    tmp_path: Path, node: NodeProcess
) -> None:
    big = os.urandom(BIG)
    image = build_sample_image(tmp_path / "img", {"data/big.bin": big})
    node.start()
    target, wtarget = tmp_path / "m", tmp_path / "w"
    node.cli("image", "mount", str(image), str(target))
    node.cli("image", "mount", str(image), str(wtarget), "--rw")
    (wtarget / "data/new.txt").write_bytes(b"written before the kill\n")
    subprocess.run(["sync", "-f", str(wtarget / "data/new.txt")], check=True)
    _drop_caches()
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import hashlib, sys, time\n"
         "h = hashlib.sha256()\n"
         "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
         "    while b := f.read(1 << 20):\n"
         "        h.update(b)\n"
         "        time.sleep(0.01)\n"  # >= 1 s in all: the kill lands mid-file on any machine
         "print(h.hexdigest())\n",
         str(target / "data/big.bin")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.3)
    assert reader.poll() is None, "the read finished before the kill"
    node.kill(signal.SIGKILL)
    assert reader.poll() is None, "the reader failed while the service was dead"
    suspended = [m for m in mounts.list_mounts() if mounts.suspended(m)]
    assert len(suspended) == 2
    assert "suspended" in node.cli("image", "mounts").stdout
    done = node.cli("image", "umount", str(target), check=False)
    assert done.returncode != 0 and "suspended" in done.stderr and "\n" not in done.stderr.strip()
    time.sleep(0.5)  # the reader waits: a pause, not EIO
    assert reader.poll() is None
    node.start()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert out.strip() == hashlib.sha256(big).hexdigest()
    assert (wtarget / "data/new.txt").read_bytes() == b"written before the kill\n"
    assert {m.server_pid for m in mounts.list_mounts()} == {node.pid}
    node.cli("image", "umount", str(target))
    node.cli("image", "umount", str(wtarget))
    node.cli("image", "mount", str(image), str(wtarget), "--rw")
    assert (wtarget / "data/new.txt").read_bytes() == b"written before the kill\n"
    node.cli("image", "umount", str(wtarget))


def test_a_suspended_mount_is_kept_by_gc_and_ended_by_force(
    tmp_path: Path, node: NodeProcess
) -> None:
    image = build_sample_image(tmp_path / "img", {"etc/which": b"x\n"})
    node.start()
    target = tmp_path / "m"
    node.cli("image", "mount", str(image), str(target))
    node.kill(signal.SIGTERM)  # an upgrade's stop: mounts stay, suspended
    (info,) = mounts.list_mounts()
    assert mounts.suspended(info)
    assert mounts.cleanup_stale() == []
    with pytest.raises(MountError, match="suspended"):
        mounts.unmount(target)
    mounts.unmount(target, force=True)
    assert mounts.list_mounts() == []


@pytest.mark.registry
def test_a_lazy_mount_resumes_from_the_chunk_cache(tmp_path: Path, node: NodeProcess) -> None:
    """A pulled image mounted by reference: chunks fetched before the kill stay in the cache,
    the rest comes from the registry after the restart; the reader gets every byte."""
    from tidal.blobs.distribution import push_image
    from tidal.blobs.reference import ImageReference
    from tidal.blobs.registry_client import RegistryClient
    from tidal.testing.registry_server import RegistryServer

    big = os.urandom(32 << 20)
    image = build_sample_image(tmp_path / "img", {"data/big.bin": big})
    node.env["TIDAL_BLOBS__CACHE_DIR"] = str(tmp_path / "chunks")
    with RegistryServer() as server, RegistryClient(server.address) as client:
        ref = f"{server.address}/node/lazy:v1"
        push_image(image, ImageReference.parse(ref), client)
        node.start()
        node.cli("pull", ref)
        target = tmp_path / "m"
        with node.client() as c:
            info = c.mount(ref, target)
        assert info.server_pid == node.pid and "images/sha256" in info.image_dir
        reader = subprocess.Popen(
            [sys.executable, "-c",
             "import hashlib, sys, time\n"
             "h = hashlib.sha256()\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    while b := f.read(1 << 20):\n"
             "        h.update(b)\n"
             "        time.sleep(0.02)\n"
             "print(h.hexdigest())\n",
             str(target / "data/big.bin")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.3)
        assert reader.poll() is None
        node.kill(signal.SIGKILL)
        cached = sum(p.stat().st_size for p in (tmp_path / "chunks").rglob("*") if p.is_file())
        assert cached > 0, "nothing was fetched before the kill"
        node.start()
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        assert out.strip() == hashlib.sha256(big).hexdigest()
        node.cli("image", "umount", str(target))
