"""An OCI distribution client (httpx): blobs with Range, uploads, manifests, tags, auth, retries.

A failed request's HTTP status maps onto Tidal's errors in :func:`_raise_for` (the token
endpoint's in :meth:`_fetch_token`'s own two checks): 401/403 -> :class:`RegistryAuthError`, 404 -> :class:`BlobNotFoundError` (or
:class:`ManifestNotFoundError`), 429/5xx and connection failures -> retried with exponential
backoff, then :class:`RegistryUnavailableError`. Auth follows the distribution spec: on a 401
the ``WWW-Authenticate`` challenge says ``Basic`` (send the credentials) or ``Bearer`` (fetch a
token for the repository scope from the realm, cache it). Credentials are never logged.

:class:`RegistryBlobStore` exposes one repository as a :class:`~tidal.blobs.source.BlobStore`,
so the chunk cache and the chain treat a registry like any other blob source.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from tidal.blobs.auth import (
    Challenge,
    Credentials,
    TokenCache,
    load_credentials,
    parse_token_response,
    parse_www_authenticate,
)
from tidal.blobs.breaker import CircuitBreaker
from tidal.blobs.settings import BlobSettings
from tidal.blobs.source import ReadableStream, check_blob_range, verify_digest
from tidal.errors import (
    BlobIntegrityError,
    BlobNotFoundError,
    BlobRangeError,
    ConfigError,
    ManifestNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
)
from tidal.ids import Digest, parse_digest, sha256_digest, short_digest
from tidal.image.oci import (
    DOCKER_LIST_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    OCI_INDEX_MEDIA_TYPE,
    OCI_MANIFEST_MEDIA_TYPE,
)

log = logging.getLogger("tidal.blobs.registry")

MANIFEST_ACCEPT = (
    OCI_MANIFEST_MEDIA_TYPE,
    OCI_INDEX_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    DOCKER_LIST_MEDIA_TYPE,
)
INDEX_MEDIA_TYPES = (OCI_INDEX_MEDIA_TYPE, DOCKER_LIST_MEDIA_TYPE)
RETRY_AFTER_MAX_S = 30.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ManifestResponse:
    """A fetched manifest: its exact bytes (digests are over bytes), type and digest."""

    media_type: str
    digest: Digest
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"manifest {short_digest(self.digest)} is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise RegistryError(f"manifest {short_digest(self.digest)} is not a JSON object")
        return doc

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


def is_insecure_host(registry: str, extra: Iterable[str] = ()) -> bool:
    """Whether to speak plain HTTP to ``registry``: loopback always, others only if listed."""
    if registry in set(extra):
        return True
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RegistryClient:
    """One registry (``host[:port]``); thread-safe; use as a context manager or ``close()``.

    ``transport`` replaces the network (an ``httpx.MockTransport`` in pure tests); ``sleep``
    replaces ``time.sleep`` for backoff, so retry tests take no time.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        settings: BlobSettings | None = None,
        scheme: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        load_auth_file: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or BlobSettings()
        self.registry = registry
        if scheme is None:
            insecure = is_insecure_host(registry, self.settings.insecure_registries)
            scheme = "http" if insecure else "https"
        self.base_url = f"{scheme}://{registry}"
        if credentials is None and load_auth_file:
            credentials = load_credentials(registry, self.settings.auth_file)
        self._credentials = credentials
        self._sleep = sleep
        self.breaker = CircuitBreaker(
            f"registry {registry}",
            probe_interval_s=self.settings.probe_interval_s,
            clock=clock,
            error=RegistryUnavailableError,
        )
        self._tokens = TokenCache()
        self._token_keys: list[tuple[str, str, str]] = []
        self._basic = False  # the registry asked for Basic once: send it up front from now on
        self._lock = threading.Lock()
        pool = max(self.settings.fetch_concurrency, self.settings.prefetch_concurrency) + 4
        verify: ssl.SSLContext | bool = True
        if self.settings.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(self.settings.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"[blobs] ca_file {self.settings.ca_file} is not a readable PEM bundle: {exc}"
                ) from exc
        self._http = httpx.Client(
            transport=transport,
            verify=verify,
            timeout=self.settings.request_timeout_s,
            follow_redirects=True,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )
        self.requests = 0
        self.retries = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._http.close()

    def blob_store(self, repo: str) -> RegistryBlobStore:
        """One repository of this registry as a blob store."""
        return RegistryBlobStore(self, repo)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the request loop: auth, retries, error table ----------------------------------------

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self.base_url + path_or_url

    def _scope(self, repo: str | None, push: bool) -> str:
        if repo is None:
            return ""
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def _auth_header(self, scope: str) -> str | None:
        if self._basic and self._credentials is not None:
            return self._credentials.basic_header()
        with self._lock:
            keys = [k for k in self._token_keys if k[2] == scope]
        for key in keys:
            token = self._tokens.get(key)
            if token is not None:
                return f"Bearer {token}"
        return None

    def _answer_challenge(self, response: httpx.Response, scope: str, what: str) -> None:
        """Obtain what the 401's challenge asks for, or raise :class:`RegistryAuthError`."""
        challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
        by_scheme: dict[str, Challenge] = {c.scheme: c for c in challenges}
        if "bearer" in by_scheme:
            self._fetch_token(by_scheme["bearer"], scope, what)
            return
        if "basic" in by_scheme:
            if self._credentials is None:
                raise RegistryAuthError(
                    f"{self.registry} wants a user name and password for {what}; add them to "
                    "the registry auth file ($TIDAL_REGISTRY_AUTH or ~/.config/tidal/auth.json)"
                )
            if self._basic:
                raise RegistryAuthError(
                    f"{self.registry} rejected the credentials of user "
                    f"{self._credentials.username!r} for {what}; check the registry auth file"
                )
            self._basic = True
            return
        raise RegistryAuthError(
            f"{self.registry} refused {what} with 401 and no usable challenge "
            f"({response.headers.get('www-authenticate', 'no WWW-Authenticate header')!r})"
        )

    def _fetch_token(self, challenge: Challenge, scope: str, what: str) -> None:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self.registry} sent a Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        wanted = challenge.params.get("scope") or scope
        key = (realm, service, scope)
        params = {k: v for k, v in (("service", service), ("scope", wanted)) if v}
        headers = {}
        if self._credentials is not None:
            headers["Authorization"] = self._credentials.basic_header()
        try:
            r = self._http.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"token endpoint {realm} of {self.registry} unreachable: {exc}"
            ) from exc
        if r.status_code in (401, 403):
            who = f"user {self._credentials.username!r}" if self._credentials else "anonymous"
            raise RegistryAuthError(
                f"token endpoint {realm} refused {who} for {what} ({r.status_code}); "
                "check the registry auth file"
            )
        if r.status_code != 200:
            raise RegistryUnavailableError(
                f"token endpoint {realm} of {self.registry} answered {r.status_code}"
            )
        self._tokens.put(key, parse_token_response(r.content, self._tokens.now(), realm))
        with self._lock:
            if key not in self._token_keys:
                self._token_keys.append(key)

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        what: str,
        repo: str | None = None,
        push: bool = False,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        ok: Iterable[int] = (200,),
        not_found: Callable[[], BlobNotFoundError] | None = None,
    ) -> httpx.Response:
        """Send with auth and retries; return a response whose status is in ``ok``."""
        ok_codes = set(ok)
        scope = self._scope(repo, push)
        url = self._url(path_or_url)
        probe = self.breaker.admit()  # raises at once while the registry is known down
        attempts = 1 if probe else max(1, self.settings.retry_attempts)
        auth_rounds = 0
        attempt = 0
        last_cause = ""
        while True:
            hdrs = dict(headers or {})
            auth = self._auth_header(scope)
            if auth:
                hdrs["Authorization"] = auth
            try:
                with self._lock:
                    self.requests += 1
                r = self._http.request(method, url, headers=hdrs, content=content, params=params)
            except httpx.TransportError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # permanent: retrying cannot help
                    raise RegistryError(
                        f"TLS certificate of {self.registry} not trusted ({exc}); add its CA to "
                        "[blobs] ca_file, or list the registry in insecure_registries if it "
                        "speaks plain HTTP"
                    ) from exc
                last_cause = f"{type(exc).__name__}: {exc}"
                retry_after = None
            else:
                if r.status_code not in _RETRY_STATUS:
                    self.breaker.success()  # it answered: up, whatever the answer
                if r.status_code in ok_codes:
                    with self._lock:
                        self.bytes_received += len(r.content)
                    return r
                if r.status_code == 401 and auth_rounds < 2:
                    auth_rounds += 1
                    self._answer_challenge(r, scope, what)
                    continue
                if r.status_code not in _RETRY_STATUS:
                    _raise_for(r, self.registry, what, not_found)
                last_cause = f"HTTP {r.status_code} {_registry_message(r)}".strip()
                retry_after = _retry_after_s(r)
            attempt += 1
            if attempt >= attempts:
                self.breaker.failure(last_cause)
                raise RegistryUnavailableError(
                    f"{what} at {self.registry} failed after {attempts} attempts "
                    f"({last_cause}); the registry is down or overloaded, retry later"
                )
            delay = min(
                self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (attempt - 1)
            )
            if retry_after is not None:
                delay = min(max(delay, retry_after), RETRY_AFTER_MAX_S)
            with self._lock:
                self.retries += 1
            log.warning("%s at %s: %s; retry %d in %.2f s", what, url, last_cause, attempt, delay)
            self._sleep(delay)

    # --- API --------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that this is a distribution registry and that we may talk to it."""
        r = self._request("GET", "/v2/", what="ping")
        api = r.headers.get("docker-distribution-api-version", "registry/2.0")
        if not api.startswith("registry/2"):
            raise RegistryError(f"{self.registry} is not an OCI distribution registry ({api})")

    def blob_size(self, repo: str, digest: Digest) -> int:
        """Size of a blob (HEAD); :class:`BlobNotFoundError` if the repository lacks it."""
        r = self._request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            what=f"HEAD blob {short_digest(digest)} of {repo}",
            repo=repo,
            not_found=lambda: BlobNotFoundError(
                f"blob {short_digest(digest)} is not in {self.registry}/{repo}"
            ),
        )
        try:
            return int(r.headers["content-length"])
        except (KeyError, ValueError):
            raise RegistryError(
                f"{self.registry} answered HEAD of blob {short_digest(digest)} without a size"
            ) from None

    def has_blob(self, repo: str, digest: Digest) -> bool:
        try:
            self.blob_size(repo, digest)
            return True
        except BlobNotFoundError:
            return False

    def get_blob(self, repo: str, digest: Digest) -> bytes:
        """The whole blob, checked against its digest."""
        r = self._get_blob(repo, digest, None)
        verify_digest(f"{self.registry}/{repo}", digest, r.content)
        return r.content

    def get_blob_range(self, repo: str, digest: Digest, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob with one HTTP Range request."""
        if end <= start:
            check_blob_range(f"{self.registry}/{repo}", digest, end, start, end)
            return b""
        r = self._get_blob(repo, digest, f"bytes={start}-{end - 1}")
        if r.status_code == 200:  # the server ignored Range: cut the range out ourselves
            data = r.content
            check_blob_range(f"{self.registry}/{repo}", digest, len(data), start, end)
            if start == 0 and end == len(data):
                verify_digest(f"{self.registry}/{repo}", digest, data)
            return data[start:end]
        if len(r.content) != end - start:
            raise RegistryError(
                f"{self.registry} answered the range [{start}, {end}) of blob "
                f"{short_digest(digest)} with {len(r.content)} bytes"
            )
        return r.content

    def _get_blob(self, repo: str, digest: Digest, range_header: str | None) -> httpx.Response:
        what = f"GET blob {short_digest(digest)} of {repo}"
        if range_header:
            what += f" {range_header}"
        return self._request(
            "GET",
            f"/v2/{repo}/blobs/{digest}",
            what=what,
            repo=repo,
            headers={"Range": range_header} if range_header else None,
            ok=(200, 206),
            not_found=lambda: BlobNotFoundError(
                f"blob {short_digest(digest)} is not in {self.registry}/{repo}"
            ),
        )

    def push_blob(self, repo: str, data: bytes, digest: Digest | None = None) -> Digest:
        """Upload a blob in one request (POST, then PUT with the digest); skipped if present."""
        digest = digest or sha256_digest(data)
        if self.has_blob(repo, digest):
            return digest
        location = self._start_upload(repo)
        self._finish_upload(repo, location, digest, data)
        return digest

    def push_blob_stream(
        self,
        repo: str,
        stream: ReadableStream,
        expected_digest: Digest | None = None,
        *,
        chunk_bytes: int | None = None,
    ) -> Digest:
        """Upload a blob of unknown length in PATCH chunks; memory bounded by one chunk.

        The digest is computed on the way and must equal ``expected_digest`` if given.
        """
        if expected_digest is not None and self.has_blob(repo, expected_digest):
            while stream.read(1024 * 1024):
                pass
            return expected_digest
        chunk_bytes = chunk_bytes or self.settings.upload_chunk_bytes
        h = hashlib.sha256()
        first = stream.read(chunk_bytes)
        location = self._start_upload(repo)
        offset = 0
        block = first
        while block:
            h.update(block)
            nxt = stream.read(chunk_bytes)
            try:
                location = self._patch_chunk(repo, location, offset, block)
            except BlobNotFoundError as exc:  # 404 on an upload: the registry dropped it
                raise RegistryError(
                    f"{self.registry} dropped the upload to {repo} at offset {offset} ({exc}); "
                    "push again"
                ) from exc
            offset += len(block)
            block = nxt
        digest = Digest("sha256:" + h.hexdigest())
        if expected_digest is not None and digest != expected_digest:
            self._cancel_upload(repo, location)
            raise BlobIntegrityError(
                f"refusing to push blob {short_digest(expected_digest)} to {self.registry}/{repo}: "
                f"the bytes read have digest {short_digest(digest)}"
            )
        self._finish_upload(repo, location, digest, b"")
        return digest

    def _patch_chunk(self, repo: str, location: str, offset: int, block: bytes) -> str:
        """Send ``block`` at ``offset``; after a partial failure, resume where the registry is.

        A retried PATCH whose first attempt got partly through is answered 416 by registries
        that check ``Content-Range`` (the spec); the upload's status (``Range: 0-N``) then says
        which part of the block still has to go. The CNCF registry instead invalidates the
        upload (404); that surfaces as a RegistryError asking to push again, and its digest
        check at the end means a broken upload can never be stored as a blob.
        """
        sent = 0
        for _ in range(3):
            part = block[sent:]
            start = offset + sent
            r = self._request(
                "PATCH",
                location,
                what=f"upload chunk at {start} to {repo}",
                repo=repo,
                push=True,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{start + len(part) - 1}",
                },
                content=part,
                ok=(202, 416),
            )
            if r.status_code == 202:
                return self._location(r, repo)
            status = self._request(
                "GET", location, what=f"upload status of {repo}", repo=repo, push=True, ok=(204,)
            )
            have = _upload_end(status.headers.get("range"))
            if not offset <= have <= offset + len(block):
                break
            location = self._location(status, repo)
            if have == offset + len(block):
                return location
            sent = have - offset
        raise RegistryError(
            f"{self.registry} lost track of the upload to {repo} at offset {offset}; push again"
        )

    def _start_upload(self, repo: str) -> str:
        r = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            what=f"start blob upload to {repo}",
            repo=repo,
            push=True,
            ok=(202,),
        )
        return self._location(r, repo)

    def _location(self, r: httpx.Response, repo: str) -> str:
        loc = r.headers.get("location")
        if not loc:
            raise RegistryError(f"{self.registry} gave no upload Location for {repo}")
        return str(r.url.join(loc))

    def _finish_upload(self, repo: str, location: str, digest: Digest, data: bytes) -> None:
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        self._request(
            "PUT",
            str(url),
            what=f"finish upload of blob {short_digest(digest)} to {repo}",
            repo=repo,
            push=True,
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            ok=(201, 204),
        )

    def _cancel_upload(self, repo: str, location: str) -> None:
        try:
            self._request(
                "DELETE",
                location,
                what=f"cancel upload to {repo}",
                repo=repo,
                push=True,
                ok=(200, 202, 204, 404),
            )
        except RegistryError as exc:  # best effort: the registry purges stale uploads itself
            log.warning("could not cancel upload to %s: %s", repo, exc)

    def put_manifest(
        self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST_MEDIA_TYPE
    ) -> Digest:
        """Store a manifest under a tag (or its digest); returns the manifest digest."""
        digest = sha256_digest(body)
        r = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            what=f"PUT manifest {repo}:{reference}",
            repo=repo,
            push=True,
            headers={"Content-Type": media_type},
            content=body,
            ok=(201, 200, 202),
        )
        echoed = r.headers.get("docker-content-digest")
        if echoed and echoed != digest:
            raise BlobIntegrityError(
                f"{self.registry} stored manifest {repo}:{reference} as {short_digest(echoed)}, "
                f"but its bytes have digest {short_digest(digest)}"
            )
        return digest

    def get_manifest(
        self, repo: str, reference: str, accept: Iterable[str] = MANIFEST_ACCEPT
    ) -> ManifestResponse:
        """A manifest or index by tag or digest; by digest, the bytes are checked against it."""
        r = self._request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            what=f"GET manifest {repo}:{reference}",
            repo=repo,
            headers={"Accept": ", ".join(accept)},
            not_found=lambda: ManifestNotFoundError(
                f"no manifest {reference!r} in {self.registry}/{repo}; check the tag with "
                "`skopeo list-tags`"
            ),
        )
        body = r.content
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise BlobIntegrityError(
                f"manifest {short_digest(reference)} from {self.registry}/{repo} has digest "
                f"{short_digest(digest)}"
            )
        media_type = r.headers.get("content-type", "").split(";")[0].strip()
        if not media_type or media_type == "application/json":
            try:
                media_type = json.loads(body).get("mediaType") or OCI_MANIFEST_MEDIA_TYPE
            except (json.JSONDecodeError, AttributeError):
                raise RegistryError(
                    f"manifest {repo}:{reference} from {self.registry} is not JSON"
                ) from None
        return ManifestResponse(media_type, digest, body)

    def resolve_manifest(
        self, repo: str, reference: str, *, os_name: str = "linux", architecture: str = "amd64"
    ) -> ManifestResponse:
        """The image manifest for one platform: follows an index / manifest list if needed."""
        m = self.get_manifest(repo, reference)
        if not m.is_index:
            return m
        for entry in m.json().get("manifests", []):
            plat = entry.get("platform") or {}
            if plat.get("os") == os_name and plat.get("architecture") == architecture:
                return self.get_manifest(repo, parse_digest(entry["digest"]))
        raise ManifestNotFoundError(
            f"{self.registry}/{repo}:{reference} has no image for {os_name}/{architecture}"
        )

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of a repository (follows ``Link`` pagination)."""
        tags: list[str] = []
        url: str | None = f"/v2/{repo}/tags/list"
        while url:
            r = self._request(
                "GET",
                url,
                what=f"list tags of {repo}",
                repo=repo,
                not_found=lambda: BlobNotFoundError(
                    f"repository {repo} does not exist in {self.registry}"
                ),
            )
            try:
                tags.extend(r.json().get("tags") or [])
            except (ValueError, AttributeError) as exc:
                raise RegistryError(
                    f"{self.registry} answered the tag list of {repo} with malformed JSON"
                ) from exc
            nxt = r.links.get("next", {}).get("url")
            url = str(r.url.join(nxt)) if nxt else None
        return tags


def _registry_message(r: httpx.Response) -> str:
    """The first error of the registry's JSON error body, e.g. ``BLOB_UNKNOWN: blob unknown``."""
    try:
        errors = r.json().get("errors") or []
        e = errors[0]
        return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""


def _upload_end(range_header: str | None) -> int:
    """Bytes an upload holds, from its status ``Range: 0-N`` header (N inclusive)."""
    if not range_header:
        return 0
    try:
        return int(range_header.split("-", 1)[1]) + 1
    except (IndexError, ValueError):
        return -1


def _retry_after_s(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # the HTTP-date form: fall back to our own backoff


def _raise_for(
    r: httpx.Response,
    registry: str,
    what: str,
    not_found: Callable[[], BlobNotFoundError] | None,
) -> None:
    """The one table from HTTP status to Tidal error."""
    detail = _registry_message(r)
    suffix = f" ({detail})" if detail else ""
    if r.status_code == 404 or (not_found is not None and "UNKNOWN" in detail):
        if not_found is not None:
            raise not_found()
        raise BlobNotFoundError(f"{what}: {registry} answered 404{suffix}")
    if r.status_code in (401, 403):
        raise RegistryAuthError(
            f"{registry} denied {what} ({r.status_code}){suffix}; check the credentials in "
            "the registry auth file and the account's access to the repository"
        )
    if r.status_code == 416:
        raise BlobRangeError(f"{registry} refused {what}: the range is outside the blob{suffix}")
    if "DIGEST_INVALID" in detail:
        raise BlobIntegrityError(f"{registry} rejected {what}: the digest does not match{suffix}")
    raise RegistryError(f"{registry} refused {what} with HTTP {r.status_code}{suffix}")


class RegistryBlobStore:
    """One repository of a registry as a :class:`~tidal.blobs.source.BlobStore`.

    Sizes from HEAD are remembered (blobs are immutable), so ``size`` costs one request per blob.
    """

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = repository
        self._sizes: dict[Digest, int] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"registry {self.client.registry}/{self.repository}"

    @property
    def supports_ranges(self) -> bool:
        return True

    @property
    def is_remote(self) -> bool:
        return True

    def has(self, digest: Digest) -> bool:
        try:
            self.size(digest)
            return True
        except BlobNotFoundError:
            return False

    def remember_size(self, digest: Digest, size_bytes: int) -> None:
        """Take a blob's size from a manifest, sparing the HEAD request before its first read."""
        with self._lock:
            self._sizes[digest] = size_bytes

    def size(self, digest: Digest) -> int:
        with self._lock:
            known = self._sizes.get(digest)
        if known is not None:
            return known
        size = self.client.blob_size(self.repository, digest)
        with self._lock:
            self._sizes[digest] = size
        return size

    def read(self, digest: Digest, start: int, end: int) -> bytes:
        size = self.size(digest)  # one HEAD per blob, then remembered
        check_blob_range(self.name, digest, size, start, end)
        if start == 0 and end == size:
            return self.client.get_blob(self.repository, digest)
        return self.client.get_blob_range(self.repository, digest, start, end)

    def put(self, stream: ReadableStream, expected_digest: Digest | None = None) -> Digest:
        return self.client.push_blob_stream(self.repository, stream, expected_digest)

    def put_bytes(self, data: bytes, expected_digest: Digest | None = None) -> Digest:
        digest = sha256_digest(data)
        if expected_digest is not None and digest != expected_digest:
            raise BlobIntegrityError(
                f"refusing to push blob {short_digest(expected_digest)} to {self.name}: "
                f"the bytes have digest {short_digest(digest)}"
            )
        return self.client.push_blob(self.repository, data, digest)
