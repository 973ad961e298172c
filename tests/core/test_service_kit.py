"""The service kit (tidal.service): routes, the one error table and shape, health, metrics,
TCP and unix sockets; and the clients' side over httpx.MockTransport."""

from __future__ import annotations

import json
import threading
from email.message import Message
from pathlib import Path

import httpx
import pytest

from tidal.errors import (
    BlobNotFoundError,
    BlobRangeError,
    ConfigError,
    ContainerNotFoundError,
    ContainerStateError,
    EngineError,
    NotFoundError,
    P2PError,
    QosError,
    RegistryUnavailableError,
    TidalError,
)
from tidal.service.server import (
    Request,
    Response,
    Route,
    Service,
    TcpServiceServer,
    UnixServiceServer,
)
from tidal.service.wire import error_body, error_from_body, raise_for_error, status_for


def _service() -> Service:
    def echo(req: Request) -> dict[str, object]:
        return {"params": dict(req.params), "query": dict(req.query), "body": req.json()}

    def fail(req: Request) -> None:
        raise {
            "missing": ContainerNotFoundError("no container 'web'; see tidal ps"),
            "state": ContainerStateError("web is running; use rm --force"),
            "bad": ConfigError("--cpus -1 is not a positive number"),
            "later": RegistryUnavailableError("registry at 127.0.0.1:5000 did not answer"),
            "bug": KeyError("oops"),
        }[req.params["how"]]

    return Service(
        "the test service",
        [
            Route("GET", "/v1/things/{name}", echo),
            Route("POST", "/v1/things/{name}", echo),
            Route("GET", "/v1/rest/{tail:path}", echo),
            Route("GET", "/v1/fail/{how}", fail),
            Route(
                "GET",
                "/v1/raw",
                lambda _: Response(b"\x00\x01", 206, "application/x", {"X-A": "1"}),
            ),
        ],
        error=EngineError,
    )


def _get(service: Service, target: str, method: str = "GET", body: bytes = b"") -> Response:
    return service.handle(method, target, Message(), body)


def test_status_table_is_first_match() -> None:
    assert status_for(ContainerNotFoundError("x")) == 404
    assert status_for(BlobNotFoundError("x")) == 404
    assert status_for(ContainerStateError("x")) == 409
    assert status_for(BlobRangeError("x")) == 416
    assert status_for(ConfigError("x")) == 400
    assert status_for(RegistryUnavailableError("x")) == 503
    assert status_for(P2PError("x")) == 503  # a BlobUnavailableError: retryable
    assert status_for(QosError("x")) == 500
    assert status_for(KeyError("x")) == 500


def test_routes_params_query_and_bodies() -> None:
    s = _service()
    r = _get(s, "/v1/things/a%20b?x=1&x=2&y=3")
    assert r.status == 200 and r.content_type == "application/json"
    assert json.loads(r.body) == {
        "params": {"name": "a b"},
        "query": {"x": "2", "y": "3"},
        "body": None,
    }
    r = _get(s, "/v1/things/t", "POST", b'{"k": [1]}')
    assert json.loads(r.body)["body"] == {"k": [1]}
    assert json.loads(_get(s, "/v1/rest/a/b/c").body)["params"] == {"tail": "a/b/c"}
    raw = _get(s, "/v1/raw")
    assert (raw.status, raw.body, raw.content_type, raw.headers["X-A"]) == (
        206,
        b"\x00\x01",
        "application/x",
        "1",
    )


def test_errors_have_one_shape_and_the_table_status() -> None:
    s = _service()
    for how, status, cls in [
        ("missing", 404, "ContainerNotFoundError"),
        ("state", 409, "ContainerStateError"),
        ("bad", 400, "ConfigError"),
        ("later", 503, "RegistryUnavailableError"),
    ]:
        r = _get(s, f"/v1/fail/{how}")
        assert r.status == status
        body = json.loads(r.body)
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == cls
    bug = _get(s, "/v1/fail/bug")
    assert bug.status == 500
    assert json.loads(bug.body)["error"] == {
        "type": "EngineError",  # the service's own root class
        "message": "internal error in the test service: KeyError('oops')",
    }
    nope = json.loads(_get(s, "/v1/nothing").body)["error"]
    assert nope["type"] == "NotFoundError" and "no route GET /v1/nothing" in nope["message"]
    wrong = _get(s, "/v1/fail/bad", "POST")
    assert wrong.status == 404 and "(GET only)" in json.loads(wrong.body)["error"]["message"]
    bad_json = _get(s, "/v1/things/t", "POST", b"{nope")
    assert bad_json.status == 400
    assert json.loads(bad_json.body)["error"]["message"].startswith("request body is not JSON")


def test_healthz_runs_the_checks() -> None:
    s = _service()
    assert (_get(s, "/healthz").status, json.loads(_get(s, "/healthz").body)) == (
        200,
        {"status": "ok"},
    )
    problems: list[str | None] = [None]
    s.health_checks.append(lambda: problems[0])
    s.health_checks.append(lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    r = _get(s, "/healthz")
    assert r.status == 503
    assert json.loads(r.body)["problems"] == ["health check <lambda> failed: division by zero"]
    problems[0] = "the round loop has stopped"
    assert json.loads(_get(s, "/healthz").body)["problems"][0] == "the round loop has stopped"


def test_metrics_one_registry_per_instance() -> None:
    a, b = _service(), _service()
    _get(a, "/v1/things/x")
    _get(a, "/v1/fail/missing")
    text = _get(a, "/metrics").body.decode()
    assert (
        'tidal_http_requests_total{route="/v1/things/{name}",service="the test service",status="200"} 1.0'
        in text
    )
    assert 'status="404"} 1.0' in text
    assert "tidal_http_request_seconds_bucket" in text
    assert "/v1/things/{name}" not in _get(b, "/metrics").body.decode()  # b counted nothing of a's


def test_tcp_and_unix_servers_keep_alive_and_stop(tmp_path: Path) -> None:
    before = threading.active_count()
    tcp = TcpServiceServer("127.0.0.1", 0, _service()).start()
    unix = UnixServiceServer(str(tmp_path / "s.sock"), _service()).start()
    try:
        with httpx.Client(base_url=tcp.url) as c:
            assert [c.get("/v1/things/t").status_code for _ in range(3)] == [200] * 3
            assert c.get("/healthz").json() == {"status": "ok"}
        transport = httpx.HTTPTransport(uds=str(tmp_path / "s.sock"))
        with httpx.Client(transport=transport, base_url="http://x") as c:
            assert c.get("/v1/things/u").json()["params"] == {"name": "u"}
            assert c.head("/v1/raw").headers["content-length"] == "2"
            with pytest.raises(ContainerStateError, match="rm --force"):
                raise_for_error(c.get("/v1/fail/state"), fallback=EngineError, what="test")
            held = httpx.Client(base_url=tcp.url)
            assert held.get("/v1/things/t").status_code == 200  # a kept-alive connection
    finally:
        tcp.stop()
        unix.stop()
    with pytest.raises(httpx.TransportError):
        held.get("/v1/things/t")  # a stopped server does not answer on old connections
    held.close()
    deadline = 50
    while threading.active_count() > before and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert threading.active_count() <= before


def test_bind_errors_name_the_service() -> None:
    first = TcpServiceServer("127.0.0.1", 0, _service())
    try:
        with pytest.raises(
            EngineError, match=r"^the test service cannot listen on 127\.0\.0\.1:\d+"
        ):
            TcpServiceServer("127.0.0.1", first.port(), _service())
    finally:
        first.stop()


def test_error_from_body_round_trips_every_class() -> None:
    for exc in (
        ContainerNotFoundError("no container 'x'"),
        ConfigError("bad --cpus"),
        P2PError("gone"),
    ):
        body = json.dumps(error_body(exc)).encode()
        back = error_from_body(status_for(exc), body, fallback=EngineError, what="the daemon")
        assert type(back) is type(exc) and str(back) == str(exc)
    unknown = json.dumps({"error": {"type": "SomethingElse", "message": "m"}}).encode()
    assert type(error_from_body(500, unknown, fallback=QosError, what="x")) is QosError
    proxy = error_from_body(
        502, b"<html>\n bad gateway\n</html>", fallback=EngineError, what="the daemon"
    )
    assert type(proxy) is EngineError
    assert str(proxy) == "the daemon answered HTTP 502: <html> bad gateway </html>"  # one line
    assert isinstance(error_from_body(404, b"", fallback=TidalError, what="x"), TidalError)


# --- every client takes transport= ----------------------------------------------------------


def _answer(status: int, exc: BaseException) -> httpx.MockTransport:
    return httpx.MockTransport(lambda req: httpx.Response(status, json=error_body(exc)))


def test_engine_client_reraises_the_daemon_error_over_a_mock_transport(tmp_path: Path) -> None:
    from tidal.engine.client import EngineClient

    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(f"{req.method} {req.url.path}")
        if req.url.path == "/v1/ping":
            return httpx.Response(200, json={"ok": True, "api": "v1", "pid": 1})
        return httpx.Response(
            400, json=error_body(ConfigError("a container named 'web' already exists"))
        )

    with EngineClient(tmp_path / "unused.sock", transport=httpx.MockTransport(handler)) as c:
        assert c.ping()["pid"] == 1
        with pytest.raises(ConfigError) as info:
            c.remove("web")
    assert str(info.value) == "a container named 'web' already exists"  # not "daemon answered 400"
    assert seen == ["GET /v1/ping", "DELETE /v1/containers/web"]
    with (
        EngineClient(
            tmp_path / "x.sock", transport=_answer(404, ContainerNotFoundError("no container 'x'"))
        ) as c,
        pytest.raises(ContainerNotFoundError, match=r"^no container 'x'$"),
    ):
        c.inspect("x")


def test_qos_client_over_a_mock_transport() -> None:
    from tidal.qos.client import QosClient

    with QosClient(
        "http://agent",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"rounds": 3})),
    ) as c:
        assert c.status() == {"rounds": 3}
    with (
        QosClient(
            "http://agent", transport=_answer(400, ConfigError("p95_ms must be a number"))
        ) as c,
        pytest.raises(ConfigError, match="p95_ms"),
    ):
        c.report_latency("web", 1.0)

    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with (
        QosClient("http://agent", transport=httpx.MockTransport(refuse)) as c,
        pytest.raises(QosError, match="is `tidal qos agent` running"),
    ):
        c.events()


def test_p2p_clients_over_a_mock_transport() -> None:
    from tidal.blobs.p2p import RootClient, RootRing
    from tidal.blobs.peer import PeerBlobSource
    from tidal.ids import Digest

    digest = Digest("sha256:" + "ab" * 32)
    ok = httpx.MockTransport(lambda r: httpx.Response(200, json={"parent": "http://10.0.0.1:1"}))
    roots = RootClient(RootRing(["http://root:1"]), transport=ok)
    assert roots.join(digest, "http://10.0.0.2:1") == "http://10.0.0.1:1"
    roots.close()
    refused = RootClient(
        RootRing(["http://root:1"]),
        transport=_answer(400, ConfigError("node 'x' is not an http(s) URL")),
    )
    with pytest.raises(P2PError, match=r"refused join .*http\(s\) URL"):  # still a P2PError
        refused.join(digest, "x")
    refused.close()

    def peer(req: httpx.Request) -> httpx.Response:
        if req.headers.get("Range") == "bytes=0-3":
            return httpx.Response(206, content=b"abcd")
        return httpx.Response(404, json=error_body(BlobNotFoundError("no layer")))

    src = PeerBlobSource("http://peer:1", transport=httpx.MockTransport(peer))
    assert src.read(digest, 0, 4) == b"abcd"
    with pytest.raises(BlobNotFoundError):
        src.read(digest, 4, 8)
    src.close()


def test_not_found_subclasses_stay_file_not_found() -> None:
    back = error_from_body(
        404, json.dumps(error_body(NotFoundError("gone"))).encode(), fallback=EngineError, what="x"
    )
    assert isinstance(back, FileNotFoundError) and str(back) == "gone"


def test_a_peer_server_starts_without_prometheus_client() -> None:
    """A P2P peer starts inside each lazy mount's FUSE server before it reports ready: the
    metrics library loads at the first request, not on the mount path."""
    import subprocess
    import sys

    code = (
        "import sys; from tidal.blobs.peer import PeerServer; import tidal.blobs.distribution; "
        "s = PeerServer({}, '127.0.0.1', 0).start(); "
        "print('prometheus_client' in sys.modules); s.stop()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_engine_discovery_over_a_mock_transport(tmp_path: Path) -> None:
    from tidal.qos.discovery import EngineDiscovery

    answers = [
        httpx.Response(
            200,
            json=[
                {
                    "id": "c1",
                    "name": "web",
                    "status": "running",
                    "cgroup": "/tidal/c1",
                    "spec": {"labels": [["app", "web"]]},
                }
            ],
        ),
        httpx.Response(503, json=error_body(RegistryUnavailableError("the database is locked"))),
    ]
    d = EngineDiscovery(
        tmp_path / "unused.sock", transport=httpx.MockTransport(lambda r: answers.pop(0))
    )
    try:
        assert [(c.name, c.cgroup, c.labels) for c in d.containers()] == [
            ("web", "tidal/c1", {"app": "web"})
        ]
        assert [c.name for c in d.containers()] == [
            "web"
        ]  # the daemon refused: the last list stands
        assert d.last_error is not None and "the database is locked" in d.last_error
    finally:
        d.close()
