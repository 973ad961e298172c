"""A minimal distribution token server (RS256 JWTs signed with openssl) for bearer-auth tests.

It issues tokens in the format the CNCF registry verifies: header with the signing
certificate in ``x5c``, claims ``iss``/``aud``/``exp``/``nbf`` and the granted ``access`` list.
Users and the repositories each may touch are given by the test.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ISSUER = "tidal-test-issuer"
SERVICE = "tidal-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Serves ``GET /token?service=..&scope=..`` on a loopback port, in a thread."""

    def __init__(self, workdir: Path, users: dict[str, str], grants: dict[str, set[str]]) -> None:
        self.key = workdir / "token-key.pem"
        self.cert = workdir / "token-cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=tidal-token-issuer", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.users = users
        self.grants = grants
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                server.requests.append(q)
                user = server._user(self.headers.get("Authorization", ""))
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": server._token(user, q), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="token-server")
        self._thread.start()

    def _user(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == pw else None

    def _token(self, user: str, q: dict[str, str]) -> str:
        access = []
        scope = q.get("scope", "")
        if scope.startswith("repository:"):
            _, name, actions = scope.split(":", 2)
            if name in self.grants.get(user, set()):
                access.append({"type": "repository", "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": q.get("service", ""),
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
