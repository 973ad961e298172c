"""Takeover of a live FUSE connection: SIGKILL the server mid-read, resume in a new process.

The server runs in a child process (``fuse_ll_child.py``) with a slowed device that stops
answering just before the kill, so the kernel surely has requests in flight when it dies; the fd store keeps the connection open; a new server
process takes the fds from the store and resumes (FUSE_NOTIFY_RESEND). A reader in a third
process reads a file from ext4 on a loop device on the FUSE disk throughout, and must finish
with the right bytes. Nothing may leak: loop devices, mounts (checked by conftest under
``tmp_path``) and fd store entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.blockdev import ext4, loop
from tidal.blockdev.ext4 import Ext4Format
from tidal.blockdev.fdstore import FdStore
from tidal.errors import MountError
from tidal.image.manifest import ImageWriter

from .conftest import build_sample_image
from .fuse_ll_child import HERE, holder

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop]

READER = (
    "import hashlib, sys\n"
    "h = hashlib.sha256()\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    for block in iter(lambda: f.read(1 << 20), b''):\n"
    "        h.update(block)\n"
    "print(h.hexdigest())\n"
)
WRITER = (
    "import os, sys\n"
    "with open(sys.argv[1], 'wb') as f:\n"
    "    f.write(bytes.fromhex(sys.argv[2]) * 4096)\n"
    "    f.flush()\n"
    "    os.fsync(f.fileno())\n"
)


@pytest.fixture
def store() -> Iterator[FdStore]:
    with holder() as s:
        yield s


class Server:
    """One child server process; ``stats()`` reads what it reports."""

    def __init__(self, image: Path, mnt: Path, store: FdStore, *extra: str) -> None:
        self.stats_path = mnt.parent / f"stats-{time.monotonic_ns()}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), str(image), str(mnt), str(store.socket_path), "disk",
             "--stats", str(self.stats_path), *extra],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"server did not start: {line!r}"

    def stats(self) -> dict[str, int]:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return dict(json.loads(self.stats_path.read_text()))
        return {"bytes_read": 0, "resent": 0, "stalled": 0}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: the server unmounts its disk and drops its fd store entry."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=90)  # its unmount may wait 60 s (see child)
        assert self.proc.returncode == 0 and "closed" in out, out


def _wait_for(cond: object, timeout_s: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


@contextlib.contextmanager
def ext4_on(disk: Path, target: Path, *, readonly: bool) -> Iterator[str]:
    lo = loop.attach(disk, readonly=readonly)
    try:
        assert lo.direct_io, "the loop device reads the FUSE file without a page cache"
        yield lo.device
    finally:
        if ext4.is_mountpoint(target):
            ext4.umount(target, lazy_fallback=True)
        loop.detach(lo.device)


@pytest.mark.parametrize("kills", [1, 3])
def test_sigkill_mid_read_then_resume_the_reader_gets_the_right_bytes(
    tmp_path: Path, store: FdStore, kills: int
) -> None:
    """``kills`` servers in a row die mid-read; each next one resumes what the last left."""
    payload = random.Random(16).randbytes(24 << 20)
    image = build_sample_image(tmp_path / "build", {"big.bin": payload})
    mnt, target = tmp_path / "fuse", tmp_path / "root"
    mnt.mkdir()
    target.mkdir()
    servers: list[Server] = []
    reader: subprocess.Popen[str] | None = None

    def slow(*extra: str) -> Server:  # stops answering after 2 MiB more of the file
        return Server(image, mnt, store, "--delay-s", "0.005", "--stall-after-bytes",
                      str(2 << 20), *extra)  # fmt: skip

    try:
        servers.append(slow())
        with ext4_on(mnt / "disk", target, readonly=True) as dev:
            ext4.mount(dev, target, readonly=True)  # fresh mount: the file's pages are cold
            reader = subprocess.Popen(
                [sys.executable, "-c", READER, str(target / "big.bin")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(kills):
                doomed = servers[-1]
                _wait_for(
                    lambda s=doomed: s.stats()["stalled"] >= 1,
                    60,
                    lambda r=reader, k=i: (
                        f"a read in flight at kill {k} (servers: "
                        f"{[x.stats() for x in servers]}, reader exit {r.poll()})"
                    ),
                )
                doomed.kill()
                time.sleep(0.3)
                assert reader.poll() is None, "the reader must wait for the next server, not fail"
                assert ext4.is_mountpoint(mnt), "the fd store keeps the connection alive"
                assert store.names() == ["disk"]
                last = i == kills - 1
                servers.append(Server(image, mnt, store, "--resume") if last else slow("--resume"))
                _wait_for(lambda: servers[-1].stats()["resent"] >= 1, 60, "requests resent")
            out, err = reader.communicate(timeout=120)
            assert reader.returncode == 0, err
            assert out.strip() == hashlib.sha256(payload).hexdigest()
            assert servers[-1].stats()["bytes_read"] > 0
            ext4.umount(target)
        servers[-1].stop()
    finally:
        if reader is not None:
            reader.kill()  # it may sit in a FUSE wait until the store lets the connection go
        for s in servers:
            if s.proc.poll() is None:
                s.kill()
            if s.proc.stdout is not None:
                s.proc.stdout.close()
        if reader is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                reader.communicate(timeout=10)
        if ext4.is_mountpoint(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not ext4.is_mountpoint(mnt)
    assert store.names() == [], "no fd store entry leaks"


def test_flushed_writes_survive_the_kill_and_writes_in_flight_complete(
    tmp_path: Path, store: FdStore
) -> None:
    image, wdir = tmp_path / "img", tmp_path / "w"
    ImageWriter(image, 64 << 20).write_manifest()
    mnt, target = tmp_path / "fuse", tmp_path / "root"
    mnt.mkdir()
    target.mkdir()
    before_kill = random.Random(5).randbytes(3 << 20)
    first = Server(image, mnt, store, "--writable", str(wdir))
    second = None
    try:
        with ext4_on(mnt / "disk", target, readonly=False) as dev:
            ext4.mkfs(dev, Ext4Format(), error=MountError)
            ext4.mount(dev, target, readonly=False)
            (target / "before.bin").write_bytes(before_kill)
            os.sync()  # ext4 -> loop -> FUSE WRITE + FSYNC: in the writable layer's files
            first.kill()
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(target / "during.bin"), "abcd"],
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            second = Server(image, mnt, store, "--resume", "--writable", str(wdir))
            _out, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
            ext4.umount(target)
        with ext4_on(mnt / "disk", target, readonly=True) as dev:  # a fresh loop: no cache
            ext4.mount(dev, target, readonly=True)
            assert (target / "before.bin").read_bytes() == before_kill
            assert (target / "during.bin").read_bytes() == bytes.fromhex("abcd") * 4096
            ext4.umount(target)
        second.stop()
    finally:
        for s in (first, second):
            if s is not None and s.proc.poll() is None:
                s.kill()
            if s is not None and s.proc.stdout is not None:
                s.proc.stdout.close()
        if ext4.is_mountpoint(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert store.names() == []
