"""The registry process helper and the throttled link: start, answer, stop, leave nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tidal.blobs.settings import load_blob_settings
from tidal.errors import ConfigError, RegistryServerError
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer


@pytest.mark.registry
def test_server_starts_answers_and_stops_without_leftovers(tmp_path: Path) -> None:
    server = RegistryServer(storage_dir=tmp_path / "storage", users={"u": "p"})
    with server:
        assert server.running
        assert httpx.get(f"{server.url}/v2/").status_code == 401
        assert httpx.get(f"{server.url}/v2/", auth=("u", "p")).status_code == 200
        htpasswd = (server.workdir or Path("/nonexistent")) / "htpasswd"
        assert htpasswd.read_text().startswith("u:$2y$")  # bcrypt, and no clear text
        assert "p\n" not in htpasswd.read_text()
        workdir = server.workdir
    assert not server.running
    assert workdir is not None and not workdir.exists()
    assert (tmp_path / "storage").is_dir()  # a given storage dir is the caller's: kept
    server.stop()  # idempotent
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v2/", timeout=1.0)


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(RegistryServerError, match="docker-registry"):
        RegistryServer(binary="no-such-registry-binary").start()


@pytest.mark.registry
def test_a_registry_on_a_taken_port_is_refused(tmp_path: Path) -> None:
    with RegistryServer() as first:
        second = RegistryServer(port=first.port)
        try:
            with pytest.raises(RegistryServerError, match=f"port {first.port} .* in use"):
                second.start()
            assert not second.running
            assert second.workdir is not None and not second.workdir.exists()
        finally:
            second.stop()


@pytest.mark.netns
def test_throttled_link_reaches_a_registry_in_its_namespace() -> None:
    with (
        ThrottledLink(200, name=f"t{os.getpid() % 10000}") as link,
        RegistryServer(host=link.ns_address, wrap=link.exec_prefix) as server,
    ):
        assert httpx.get(f"{server.url}/v2/", timeout=5).status_code == 200
        netns = link.netns
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert netns not in out.stdout


def test_blob_settings_from_toml_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "tidal.toml"
    cfg.write_text('[blobs]\ncache_capacity_bytes = 1048576\ninsecure_registries = ["r:5000"]\n')
    s = load_blob_settings(cfg, env={"TIDAL_BLOBS__FETCH_CONCURRENCY": "3"})
    assert (s.cache_capacity_bytes, s.fetch_concurrency) == (1 << 20, 3)
    assert s.insecure_registries == ("r:5000",)
    with pytest.raises(ConfigError, match="unknown setting"):
        load_blob_settings(cfg, env={"TIDAL_BLOBS__NO_SUCH": "1"})


def test_a_registry_process_that_exits_is_reported_with_its_status() -> None:
    server = RegistryServer(binary="false")  # starts, then exits at once
    with pytest.raises(RegistryServerError, match="exited with status 1"):
        server.start()
    assert not server.running
