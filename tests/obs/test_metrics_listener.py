"""The TCP metrics listener: only metrics and health leave the unix socket; its address."""

from __future__ import annotations

from email.message import Message

import httpx
import pytest

from tidal.engine.settings import EngineSettings
from tidal.errors import ConfigError
from tidal.node.settings import NodeSettings
from tidal.service.server import MetricsListener, Route, Service, parse_listen


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("15800", ("127.0.0.1", 15800)),
        (":15800", ("127.0.0.1", 15800)),
        ("0.0.0.0:15800", ("0.0.0.0", 15800)),
        ("[::1]:15800", ("::1", 15800)),
    ],
)
def test_listen_address_defaults_to_loopback(value: str, want: tuple[str, int]) -> None:
    assert parse_listen(value) == want


@pytest.mark.parametrize("value", ["", "web", "host:", "1.2.3.4:0", "70000", "h:p"])
def test_bad_listen_address_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=r"give HOST:PORT or PORT") as info:
        parse_listen(value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"\[engine\] metrics_listen"):
        EngineSettings(metrics_listen=value or " ")
    with pytest.raises(ConfigError, match=r"\[node\] metrics_listen"):
        NodeSettings(metrics_listen=value or " ")


def test_listener_serves_metrics_and_health_but_not_the_api() -> None:
    calls: list[str] = []
    service = Service(
        "the engine daemon",
        [
            Route("GET", "/v1/containers", lambda _: calls.append("api") or []),
            Route("POST", "/metrics/cadvisor", lambda _: calls.append("post") or {}),
            Route("GET", "/metrics/cadvisor", lambda _: calls.append("cadvisor") or {}),
        ],
    )
    assert service.handle("GET", "/v1/containers", Message()).status == 200
    server = MetricsListener("127.0.0.1:15899", service)
    server.start()
    try:
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/v1/containers").status_code == 404
            assert http.post("/metrics/cadvisor").status_code == 404
            assert http.get("/metrics/cadvisor").status_code == 200
            assert http.get("/healthz").json() == {"status": "ok"}
            text = http.get("/metrics").text
    finally:
        server.stop()
    assert calls == ["api", "cadvisor"]
    # the service's own registry, counting what its socket answered
    assert 'route="/v1/containers"' in text
