"""The issue's "done when": on a fresh node, ``tidal instance run 127.0.0.1:PORT/web:v1
--bandwidth 5M -p HOST:80`` serves on HOST at the shaped rate. The real CLI against a real
daemon, the CNCF registry, lazy mounts, runc, tc; the image's own command serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tidal.blobs.distribution import push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blockdev.builder import build_from_dir
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.client import InstanceClient
from tidal.testing.daemon import daemon_env
from tidal.testing.registry_server import RegistryServer

from .conftest import assert_nothing_left

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.netns,
    pytest.mark.loop,
    pytest.mark.fuse,
    pytest.mark.registry,
]
BLOB = os.urandom(2_500_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_instance_run_by_reference_serves_on_the_published_port_at_the_shaped_rate(
    instance_daemon: tuple[Daemon, InstanceClient],
    busybox_rootfs: Path,
    engine_settings: EngineSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(tmp_path / "node"))  # a fresh node's image store
    tree = tmp_path / "web"
    subprocess.run(["cp", "-a", f"{busybox_rootfs}/.", str(tree)], check=True)
    (tree / "www").mkdir()
    (tree / "www" / "blob").write_bytes(BLOB)
    image = build_from_dir(
        tree, tmp_path / "image", config={"Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"]}
    ).image_dir
    env = {**daemon_env(engine_settings), "TIDAL_DATA_ROOT": str(tmp_path / "node")}
    port = _free_port()
    with RegistryServer() as server:
        ref = f"{server.address}/web:v1"
        with RegistryClient(server.address) as client:
            push_image(image, ImageReference.parse(ref), client)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "instance", "run", ref, "--name", "web",
             "--bandwidth", "5M", "-p", f"{port}:80"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        name, ip = proc.stdout.split()
        assert name == "web" and ip.count(".") == 3
        started_s = time.monotonic() - t0
        deadline = time.monotonic() + 20
        while True:  # httpd listens a moment after its process starts
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nothing answers on the published port"
                time.sleep(0.1)
        t0 = time.monotonic()
        got = httpx.get(f"http://127.0.0.1:{port}/blob", timeout=60).content
        rate = len(got) * 8 / (time.monotonic() - t0)
        assert got == BLOB
        assert 0.6 * 5e6 < rate < 1.2 * 5e6, f"{rate / 1e6:.2f} Mbit/s through the port, limit 5"
        images = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "images"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ref in images.stdout, images.stdout
        rm = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "instance", "rm", "-f", "web"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert rm.returncode == 0, rm.stderr
    assert started_s < 60
    # the image stays mounted, hot, for the next instance; released, nothing is left
    storage = instance_daemon[0].engine.storage
    assert len(storage.hot_image_mounts()) == 1
    storage.trim_hot_images(keep=0)
    assert_nothing_left(engine_settings)
