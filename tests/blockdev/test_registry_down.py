"""A registry that goes down under a lazy mount: reads fail fast, and recover when it is back.

The real CNCF registry, FUSE, loop and ext4. Before the circuit breaker each read of an
uncached file paid the whole retry schedule (5 attempts, ~3 s) before its EIO.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image
from tidal.blobs.distribution import pull_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blockdev import mounts
from tidal.testing.registry_server import RegistryServer

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop, pytest.mark.registry]

N_FILES = 40
FILES = {f"/many/f{i:03}.bin": os.urandom(96 << 10) for i in range(N_FILES)}
"""Incompressible and larger than a 64 KiB chunk: each file needs chunks of its own."""


def test_reads_fail_fast_while_the_registry_is_down_and_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(tmp_path / "chunks"))
    monkeypatch.setenv("TIDAL_BLOBS__PROBE_INTERVAL_S", "1.0")
    image = build_sample_image(tmp_path / "src", FILES)
    storage = tmp_path / "registry"
    server = RegistryServer(storage).start()
    port = server.port
    try:
        ref = ImageReference.parse(f"{server.address}/down/img:v1")
        with RegistryClient(server.address) as client:
            push_image(image, ref, client)
            pull_image(ref, tmp_path / "pulled", client)
        target = tmp_path / "mnt"
        info = mounts.mount_image(tmp_path / "pulled", target)
        try:
            server.stop()
            slow = []
            t0 = time.monotonic()
            for i in range(N_FILES // 2):
                t = time.monotonic()
                with pytest.raises(OSError) as excinfo:
                    (target / "many" / f"f{i:03}.bin").read_bytes()
                assert excinfo.value.errno == errno.EIO
                if time.monotonic() - t > 1.0:
                    slow.append(i)
            down_s = time.monotonic() - t0
            # the first read pays the retries and opens the breaker; a probe may pay one attempt
            assert len(slow) <= 2, (slow, down_s)
            assert mounts.server_alive(info)
            log = info.log_file.read_text()
            assert "failing fast" in log, log[-2000:]

            server = RegistryServer(storage, port=port).start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    data = (target / "many" / f"f{N_FILES - 1:03}.bin").read_bytes()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "reads did not recover"
                    time.sleep(0.2)
            assert data == FILES[f"/many/f{N_FILES - 1:03}.bin"]
            assert (target / "many" / "f000.bin").read_bytes() == FILES["/many/f000.bin"]
        finally:
            mounts.unmount(target, force=True)
    finally:
        server.stop()
