"""Fixtures for the scheduler tests: a fake Kubernetes API server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sched_fake_kube import FakeKube, serve


@pytest.fixture
def fake_kube() -> Iterator[FakeKube]:
    kube = FakeKube()
    srv = serve(kube)
    thread = threading.Thread(target=srv.serve_forever, name="fake-kube", daemon=True)
    thread.start()
    try:
        yield kube
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
