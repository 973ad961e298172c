"""The registry client's circuit breaker, on httpx's MockTransport and a fake clock."""

from __future__ import annotations

import httpx
import pytest

from tidal.blobs.breaker import BreakerState, CircuitBreaker
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.errors import RegistryUnavailableError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _client(up: list[bool], calls: list[str], clock: Clock) -> RegistryClient:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if not up[0]:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, headers={"docker-distribution-api-version": "registry/2.0"})

    settings = BlobSettings(retry_attempts=3, backoff_initial_s=0.1, probe_interval_s=2.0)
    return RegistryClient(
        "127.0.0.1:5999",
        settings=settings,
        transport=httpx.MockTransport(handler),
        sleep=lambda s: None,
        clock=clock,
        load_auth_file=False,
    )


def test_down_opens_fails_fast_probes_once_and_closes_on_success() -> None:
    up, calls, clock = [False], [], Clock()
    client = _client(up, calls, clock)
    with pytest.raises(RegistryUnavailableError, match="failed after 3 attempts"):
        client.ping()
    assert len(calls) == 3 and client.breaker.state is BreakerState.OPEN

    calls.clear()
    for _ in range(10):
        with pytest.raises(RegistryUnavailableError, match="failing fast, next probe in"):
            client.ping()
    assert calls == [] and client.breaker.refused == 10

    clock.now += 2.0  # the probe: one attempt, no backoff, fails: open again
    with pytest.raises(RegistryUnavailableError, match="failed after 1 attempts"):
        client.ping()
    assert len(calls) == 1 and client.breaker.state is BreakerState.OPEN

    up[0] = True
    clock.now += 1.0  # not yet time for the next probe
    with pytest.raises(RegistryUnavailableError, match="failing fast"):
        client.ping()
    clock.now += 1.0
    client.ping()  # the probe succeeds
    assert client.breaker.state is BreakerState.CLOSED
    client.ping()
    assert len(calls) == 3 and client.breaker.opened == 1


def test_a_probe_in_flight_makes_the_others_fail_fast() -> None:
    clock = Clock()
    b = CircuitBreaker("x", probe_interval_s=1.0, clock=clock)
    assert b.admit() is False
    b.failure("down")
    clock.now += 1.0
    assert b.admit() is True  # this caller probes
    with pytest.raises(Exception, match="failing fast"):
        b.admit()  # the next one does not queue behind the probe
    b.success()
    assert b.admit() is False
