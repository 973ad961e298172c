"""P2P roots and peers admit and trust only holders of the cluster token (real servers, loopback)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tidal.blobs.distribution import _p2p_node
from tidal.blobs.p2p import RootClient, RootRing, RootServer
from tidal.blobs.peer import PeerBlobSource, PeerServer
from tidal.blobs.settings import BlobSettings
from tidal.errors import AuthenticationError, BlobNotFoundError, ConfigError, P2PError
from tidal.ids import Digest
from tidal.service.auth import AUTH_HEADER, ClusterToken

DIGEST = Digest("sha256:" + "ab" * 32)


@pytest.fixture
def token() -> ClusterToken:
    return ClusterToken(ClusterToken.generate().encode())


def test_the_root_admits_members_only(token: ClusterToken) -> None:
    root = RootServer(token=token).start()
    try:
        stranger = RootClient(RootRing([root.url]))
        with pytest.raises(P2PError, match="no cluster credentials"):
            stranger.join(DIGEST, "http://10.0.0.9:1")
        wrong = RootClient(RootRing([root.url]), token=ClusterToken(b"x" * 32))
        with pytest.raises(P2PError, match=r"wrong cluster token|not trusted"):
            wrong.join(DIGEST, "http://10.0.0.9:1")
        member = RootClient(RootRing([root.url]), token=token)
        assert member.join(DIGEST, "http://10.0.0.1:1") is None
        assert member.join(DIGEST, "http://10.0.0.2:1") == "http://10.0.0.1:1"
        assert root.state.snapshot() == {DIGEST: ["http://10.0.0.1:1", "http://10.0.0.2:1"]}
        assert httpx.get(f"{root.url}/healthz").status_code == 200  # probes need no token
        for c in (stranger, wrong, member):
            c.close()
    finally:
        root.stop()


def test_a_member_does_not_trust_an_impostor_root(token: ClusterToken) -> None:
    impostor = RootServer().start()  # answers anyone, but cannot prove the token
    try:
        member = RootClient(RootRing([impostor.url]), token=token)
        with pytest.raises(P2PError, match=r"not trusted.*no valid proof"):
            member.join(DIGEST, "http://10.0.0.1:1")
        member.close()
        assert impostor.state.snapshot() == {DIGEST: ["http://10.0.0.1:1"]}  # it heard us...
    finally:
        impostor.stop()  # ...but its answer was not taken


def test_a_peer_serves_and_trusts_members_only(token: ClusterToken) -> None:
    server = PeerServer({}, token=token).start()
    try:
        url = f"http://127.0.0.1:{server.port()}"
        stranger, member = PeerBlobSource(url), PeerBlobSource(url, token=token)
        with pytest.raises(P2PError):
            stranger.size(DIGEST)
        with pytest.raises(BlobNotFoundError):  # admitted: the answer is "no such layer"
            member.size(DIGEST)
        stranger.close()
        member.close()
        r = httpx.get(f"{url}/v1/blobs/{DIGEST}", headers={"Range": "bytes=0-9"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    finally:
        server.stop()
    open_server = PeerServer({}).start()
    try:
        wary = PeerBlobSource(f"http://127.0.0.1:{open_server.port()}", token=token)
        with pytest.raises(P2PError, match="not trusted"):
            wary.size(DIGEST)
        wary.close()
    finally:
        open_server.stop()


def test_replays_and_forged_signatures_are_refused(token: ClusterToken) -> None:
    value, _ = token.sign("GET", "/v1/layers", now=1_000_000.0)
    assert token.check_request("GET", "/v1/layers", {AUTH_HEADER: value}, now=1_000_010.0)
    with pytest.raises(AuthenticationError, match="off this node's clock"):
        token.check_request("GET", "/v1/layers", {AUTH_HEADER: value}, now=1_000_000.0 + 3600)
    with pytest.raises(AuthenticationError, match="wrong cluster token"):
        token.check_request("POST", "/v1/layers", {AUTH_HEADER: value}, now=1_000_010.0)
    with pytest.raises(AuthenticationError, match="no cluster credentials"):
        token.check_request("GET", "/v1/layers", {AUTH_HEADER: "junk"})


def test_token_files_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text(ClusterToken.generate())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        ClusterToken.from_file(path)
    path.chmod(0o600)
    ClusterToken.from_file(path)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        ClusterToken(b"short")
    with pytest.raises(ConfigError, match="p2p_token_file is not"):
        _p2p_node(BlobSettings(p2p_roots=("http://127.0.0.1:9",)))
