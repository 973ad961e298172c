"""Fixtures for the virtual node: the fake API server on loopback and the official client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tidal.testing.fake_kube import FakeKube, FakeKubeServer
from tidal.vnode.kube import KubernetesNodeApi


@pytest.fixture
def fake_kube() -> Iterator[FakeKube]:
    with FakeKubeServer() as kube:
        yield kube


@pytest.fixture
def node_api(fake_kube: FakeKube) -> Iterator[KubernetesNodeApi]:
    api = KubernetesNodeApi.for_url(fake_kube.url)
    try:
        yield api
    finally:
        api.close()
