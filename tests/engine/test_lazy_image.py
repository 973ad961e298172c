"""A container whose image comes lazily from a registry: push, pull (metadata), run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tidal.blobs.distribution import pull_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.engine.containers import Engine
from tidal.engine.spec import ContainerSpec
from tidal.testing.registry_server import RegistryServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.runtime,
    pytest.mark.cgroups,
    pytest.mark.loop,
    pytest.mark.fuse,
    pytest.mark.registry,
]


def test_container_runs_from_a_pulled_image_fetched_on_demand(
    engine: Engine, busybox_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(tmp_path / "chunks"))
    with RegistryServer() as server, RegistryClient(server.address) as client:
        ref = ImageReference.parse(f"{server.address}/engine/busybox:v1")
        push_image(busybox_image, ref, client)
        pulled = tmp_path / "pulled"
        pull_image(ref, pulled, client)
        assert not (pulled / "blobs").exists()
        rec = engine.run(
            ContainerSpec(
                image=str(pulled), command=("sh", "-c", "echo from-registry; ls /bin | wc -l")
            )
        )
        try:
            rec = engine.wait(rec.id, 30)
            assert rec.status == "exited" and rec.exit_code == 0, rec
            lines = engine.logs(rec.id).data.decode().split()
            assert lines[0] == "from-registry" and int(lines[1]) > 100
        finally:
            with contextlib.suppress(Exception):
                engine.remove(rec.id, force=True)
    assert any((tmp_path / "chunks").rglob("*")), "the image's chunks came through the cache"
