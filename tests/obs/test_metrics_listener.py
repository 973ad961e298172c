"""The TCP metrics listener: only metrics and health leave the unix socket; its address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from email.message import Message
from pathlib import Path

import httpx
import pytest

from tidal.engine.client import EngineClient
from tidal.engine.settings import EngineSettings
from tidal.errors import ConfigError
from tidal.node.settings import NodeSettings
from tidal.service.server import MetricsListener, Route, Service, parse_listen
from tidal.testing.daemon import daemon_env


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


@pytest.mark.root
@pytest.mark.cgroups
def test_tidal_daemon_serves_its_metrics_on_the_port_it_is_given(
    engine_settings: EngineSettings, tmp_path: Path
) -> None:
    port = 15898
    log = tmp_path / "daemon.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidal.cli.main", "daemon", "--metrics-listen", str(port)],
            env=daemon_env(engine_settings),
            stdout=fh,
            stderr=fh,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                resp = httpx.get(f"{url}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert "tidal_engine_containers" in resp.text
        cadvisor = httpx.get(f"{url}/metrics/cadvisor", timeout=5)
        assert cadvisor.status_code == 200
        assert "# TYPE container_cpu_usage_seconds_total counter" in cadvisor.text
        assert httpx.get(f"{url}/v1/containers", timeout=5).status_code == 404
        with EngineClient(engine_settings.resolved_socket_path()) as client:
            assert client.ping()["ok"]
        assert f"metrics on {port}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0, log.read_text()


def test_a_bad_metrics_address_stops_the_daemon_with_one_line(
    engine_settings: EngineSettings,
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "daemon", "--metrics-listen", "web:"],
        env=daemon_env(engine_settings),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "error: [engine] metrics_listen 'web:': give HOST:PORT or PORT with a port from 1 to "
        "65535 (without a host it listens on 127.0.0.1)"
    ]


def test_a_bad_metrics_address_stops_the_node_service_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "TIDAL_DATA_ROOT": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "node", "serve", "--metrics-listen", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "error: [node] metrics_listen '0': give HOST:PORT or PORT with a port from 1 to 65535 "
        "(without a host it listens on 127.0.0.1)"
    ]
    assert not list(tmp_path.iterdir()), "refused before anything was made"
