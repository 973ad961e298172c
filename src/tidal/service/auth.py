"""Mutual authentication of a node's services by a shared cluster token (core).

The P2P root and every node's peer server admit only members of the cluster, and a member
trusts only a root or parent that is one. Each request carries ``X-Tidal-Auth:
<unix time>:<nonce>:<HMAC-SHA256(token, method, path, time, nonce)>``; the server checks it
(time within :data:`MAX_SKEW_S`) and answers with ``X-Tidal-Proof: HMAC(token, "answer", nonce,
status)``, which the client checks. Each side so proves it holds the token without ever
sending it, and an impostor can neither join a tree, pose as a root or parent, nor learn the
token by listening.

Why a cluster token and not mutual TLS: what authentication must stop is strangers joining
trees and posing as roots or parents; the bytes themselves are public image layers, each chunk
checked against a digest pinned by its manifest whoever serves it, so confidentiality buys
nothing, and mTLS would add a CA and a certificate per node to issue, rotate and revoke. One
secret file per cluster (``tidal p2p token``) is what operators already do for kubeadm join
tokens. Responses are authenticated as a whole (who answered), not byte by byte: the chunk
digests do that.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Generator, Mapping
from pathlib import Path

import httpx

from tidal.errors import AuthenticationError, ConfigError

AUTH_HEADER = "X-Tidal-Auth"
PROOF_HEADER = "X-Tidal-Proof"
MAX_SKEW_S = 300.0
"""How far a request's time may be from the server's (clocks of one cluster, NTP-synced)."""
MIN_TOKEN_BYTES = 16


class ClusterToken:
    """The shared secret; signs and checks requests and answers."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_TOKEN_BYTES:
            raise ConfigError(
                f"a cluster token needs at least {MIN_TOKEN_BYTES} bytes; make one with "
                "`tidal p2p token > FILE`"
            )
        self._key = secret

    @classmethod
    def generate(cls) -> str:
        return secrets.token_urlsafe(32)

    @classmethod
    def from_file(cls, path: Path) -> ClusterToken:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cluster token file {path} cannot be read ({exc.strerror or exc}); make one "
                "with `tidal p2p token > FILE`"
            ) from None
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"cluster token file {path} is readable by others: chmod 600 it")
        return cls(text.encode())

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, *, now: float | None = None) -> tuple[str, str]:
        """``(header value, nonce)`` for one request."""
        stamp = str(int(time.time() if now is None else now))
        nonce = secrets.token_hex(16)
        return f"{stamp}:{nonce}:{self._mac(method.upper(), path, stamp, nonce)}", nonce

    def check_request(
        self, method: str, path: str, headers: Mapping[str, str], *, now: float | None = None
    ) -> str:
        """The request's nonce if it is signed by a holder of the token; else raise."""
        value = _header(headers, AUTH_HEADER)
        stamp, _, rest = value.partition(":")
        nonce, _, mac = rest.partition(":")
        if not (stamp.isdigit() and nonce and mac):
            raise AuthenticationError(f"{method} {path}: no cluster credentials ({AUTH_HEADER})")
        skew = abs((time.time() if now is None else now) - int(stamp))
        if skew > MAX_SKEW_S:
            raise AuthenticationError(
                f"{method} {path}: credentials {skew:.0f} s off this node's clock (max "
                f"{MAX_SKEW_S:.0f} s): a replay, or clocks out of sync"
            )
        if not hmac.compare_digest(mac, self._mac(method.upper(), path, stamp, nonce)):
            raise AuthenticationError(f"{method} {path}: wrong cluster token")
        return nonce

    def proof(self, nonce: str, status: int) -> str:
        return self._mac("answer", nonce, str(status))

    def check_proof(self, nonce: str, status: int, headers: Mapping[str, str]) -> None:
        got = _header(headers, PROOF_HEADER)
        if not hmac.compare_digest(got, self.proof(nonce, status)):
            raise AuthenticationError(
                "the answer carries no valid proof of the cluster token: not a member of this "
                "cluster (or a different token)"
            )


def _header(headers: Mapping[str, str], name: str) -> str:
    """Case-insensitive lookup in any mapping of headers (http.server's, httpx's, a dict)."""
    want = name.lower()
    for key, value in headers.items():
        if key.lower() == want:
            return value
    return ""


class ClusterAuth(httpx.Auth):
    """httpx's auth hook: sign each request, check each answer's proof."""

    def __init__(self, token: ClusterToken) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value, nonce = self.token.sign(request.method, request.url.path)
        request.headers[AUTH_HEADER] = value
        response = yield request
        self.token.check_proof(nonce, response.status_code, response.headers)


def token_from_settings(path: Path | None) -> ClusterToken | None:
    """The token of ``path`` (None: no file configured); ``$TIDAL_P2P_TOKEN`` is not read on
    purpose: environment variables end up in process listings and crash reports."""
    if path is None:
        return None
    return ClusterToken.from_file(Path(os.path.expanduser(str(path))))
