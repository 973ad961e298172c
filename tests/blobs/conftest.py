"""Fixtures: a real CNCF registry on a loopback port (plain and with basic auth)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tidal.testing.registry_server import RegistryServer

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


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    """Fails a test that leaves a thread running (a cache's fetcher, a server's loop)."""
    before = set(threading.enumerate())
    yield
    leaked = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leaked == [], f"threads left running: {leaked}"
