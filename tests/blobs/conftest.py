"""Fixtures: a real CNCF registry on a loopback port (plain and with basic auth)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tidal.blobs.registry_server import RegistryServer

REGISTRY_USER = "tidal"
REGISTRY_PASSWORD = "s3cret-pass"


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[RegistryServer]:
    """A registry behind htpasswd basic auth (user ``tidal``)."""
    server = RegistryServer(users={REGISTRY_USER: REGISTRY_PASSWORD})
    server.start()
    try:
        yield server
    finally:
        server.stop()
