"""A small in-memory OCI distribution registry behind ``httpx.MockTransport``.

Deterministic and instant: it lets pure tests drive auth challenges, failures and odd servers
(ignoring Range) that the real registry cannot be made to produce on demand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field

import httpx

TOKEN_REALM = "http://auth.fake/token"


@dataclass
class FakeRegistry:
    auth: str = "none"  # none | basic | bearer
    users: dict[str, str] = field(default_factory=dict)
    ignore_range: bool = False
    fail_next: list[int] = field(default_factory=list)
    """Status codes to answer the next requests with (0 = connection error), in order."""
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    retry_after: str = "0"
    """Retry-After header of injected failures."""
    partial_patches: int = 0
    """Upcoming PATCHes that keep only half their bytes, then fail with 503 (a dropped link)."""
    allowed_repos: set[str] | None = None
    """With bearer auth: repositories the tokens may grant (None = all)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.transport = httpx.MockTransport(self.handle)

    # --- auth -----------------------------------------------------------------------------

    def _user(self, request: httpx.Request) -> str | None:
        h = request.headers.get("authorization", "")
        if not h.startswith("Basic "):
            return None
        user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
        return user if self.users.get(user) == pw else None

    def _authorized(self, request: httpx.Request, repo: str | None) -> bool:
        if self.auth == "none":
            return True
        if self.auth == "basic":
            return self._user(request) is not None
        h = request.headers.get("authorization", "")
        if not h.startswith("Bearer "):
            return False
        grant = json.loads(base64.b64decode(h[7:]))
        return repo is None or repo in grant["repos"]

    def _challenge(self, repo: str | None, push: bool) -> httpx.Response:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            scope = f',scope="repository:{repo}:{"pull,push" if push else "pull"}"' if repo else ""
            value = f'Bearer realm="{TOKEN_REALM}",service="fake"{scope}'
        return _error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": value})

    def _token(self, request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        self.token_requests.append(params)
        if self.users and self._user(request) is None:
            return httpx.Response(401)
        repos = []
        m = re.match(r"repository:([^:]+):", params.get("scope", ""))
        if m and (self.allowed_repos is None or m.group(1) in self.allowed_repos):
            repos.append(m.group(1))
        token = base64.b64encode(json.dumps({"repos": repos}).encode()).decode()
        return httpx.Response(200, json={"token": token, "expires_in": 300})

    # --- routing --------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.log.append((request.method, request.url.path, request.headers.get("range")))
            if self.fail_next:
                code = self.fail_next.pop(0)
                if code == 0:
                    raise httpx.ConnectError("connection refused", request=request)
                headers = {"Retry-After": self.retry_after}
                return _error(code, "UNAVAILABLE", "injected failure", headers)
            return self._route(request)

    def _route(self, request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(TOKEN_REALM):
            return self._token(request)
        path = request.url.path
        if path == "/v2/":
            if not self._authorized(request, None):
                return self._challenge(None, False)
            return httpx.Response(200, json={})
        m = re.match(r"^/v2/(.+?)/(blobs|manifests|tags)/(.*)$", path)
        if not m:
            return _error(404, "NAME_UNKNOWN", "no route")
        repo, kind, rest = m.groups()
        push = request.method in ("POST", "PUT", "PATCH", "DELETE")
        if not self._authorized(request, repo):
            return self._challenge(repo, push)
        if kind == "blobs":
            return self._blobs(request, repo, rest)
        if kind == "manifests":
            return self._manifests(request, repo, rest)
        tags = sorted(t for (r, t) in self.manifests if r == repo and not t.startswith("sha256:"))
        return httpx.Response(200, json={"name": repo, "tags": tags})

    def _blobs(self, request: httpx.Request, repo: str, rest: str) -> httpx.Response:
        if rest.startswith("uploads/"):
            uid = rest[len("uploads/") :]
            if request.method == "POST":
                uid = uuid.uuid4().hex
                self.uploads[uid] = bytearray()
                return httpx.Response(202, headers={"Location": f"/v2/{repo}/blobs/uploads/{uid}"})
            buf = self.uploads.get(uid)
            if buf is None:
                return _error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
            loc = {"Location": f"/v2/{repo}/blobs/uploads/{uid}?_state=x"}
            if request.method == "GET":
                end = max(len(buf) - 1, 0)
                return httpx.Response(204, headers={**loc, "Range": f"0-{end}"})
            if request.method == "PATCH":
                start = int(request.headers["content-range"].split("-")[0])
                if start != len(buf):
                    return _error(416, "BLOB_UPLOAD_INVALID", "range does not follow")
                if self.partial_patches:
                    self.partial_patches -= 1
                    buf += request.content[: len(request.content) // 2]
                    return _error(503, "UNAVAILABLE", "connection dropped")
                buf += request.content
                return httpx.Response(202, headers=loc)
            if request.method == "PUT":
                buf += request.content
                digest = request.url.params["digest"]
                if "sha256:" + hashlib.sha256(buf).hexdigest() != digest:
                    return _error(400, "DIGEST_INVALID", "digest did not match")
                self.blobs[digest] = bytes(buf)
                del self.uploads[uid]
                return httpx.Response(201, headers={"Docker-Content-Digest": digest})
            if request.method == "DELETE":
                del self.uploads[uid]
                return httpx.Response(204)
        data = self.blobs.get(rest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": rest}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        rng = request.headers.get("range")
        if rng and not self.ignore_range:
            lo, hi = (int(x) for x in rng.removeprefix("bytes=").split("-"))
            part = data[lo : hi + 1]
            return httpx.Response(
                206, content=part, headers={"Content-Range": f"bytes {lo}-{hi}/{len(data)}"}
            )
        return httpx.Response(200, content=data)

    def _manifests(self, request: httpx.Request, repo: str, ref: str) -> httpx.Response:
        if request.method == "PUT":
            body = request.content
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            media = request.headers["content-type"]
            self.manifests[(repo, ref)] = (media, body)
            self.manifests[(repo, digest)] = (media, body)
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        entry = self.manifests.get((repo, ref))
        if entry is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        return httpx.Response(200, content=entry[1], headers={"Content-Type": entry[0]})


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(
        status, json={"errors": [{"code": code, "message": message}]}, headers=headers
    )
