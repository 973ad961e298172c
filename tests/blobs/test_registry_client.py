"""Registry client against the in-memory fake registry: protocol, auth, retries, error mapping."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.blobs.auth import (
    Credentials,
    encode_auth_file,
    load_credentials,
    parse_auth_file,
    parse_www_authenticate,
)
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import (
    ManifestResponse,
    RegistryBlobStore,
    RegistryClient,
    is_insecure_host,
)
from tidal.blobs.settings import BlobSettings
from tidal.errors import (
    BlobIntegrityError,
    BlobNotFoundError,
    ConfigError,
    ManifestNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
)
from tidal.ids import Digest, sha256_digest
from tidal.image.oci import (
    DOCKER_LIST_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    OCI_INDEX_MEDIA_TYPE,
    OCI_MANIFEST_MEDIA_TYPE,
)
from tidal.testing.blob_conformance import check_blob_store
from tidal.testing.fake_registry import FakeRegistry

SETTINGS = BlobSettings(retry_attempts=3, backoff_initial_s=0.5, backoff_max_s=1.5)


def make_client(
    fake: FakeRegistry, creds: Credentials | None = None, sleeps: list[float] | None = None
) -> RegistryClient:
    return RegistryClient(
        "fake.registry",
        credentials=creds,
        settings=SETTINGS,
        scheme="http",
        transport=fake.transport,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
        load_auth_file=False,
    )


def test_blob_roundtrip_monolithic_and_ranges() -> None:
    fake = FakeRegistry()
    data = os.urandom(10_000)
    with make_client(fake) as c:
        c.ping()
        digest = c.push_blob("app", data)
        assert fake.blobs[digest] == data
        assert c.blob_size("app", digest) == 10_000
        assert c.get_blob("app", digest) == data
        assert c.get_blob_range("app", digest, 100, 4196) == data[100:4196]
        assert ("GET", f"/v2/app/blobs/{digest}", "bytes=100-4195") in fake.log
        n = len(fake.log)
        assert c.push_blob("app", data) == digest  # already there: one HEAD, no upload
        assert [m for m, _, _ in fake.log[n:]] == ["HEAD"]


def test_chunked_upload_sends_patches_and_checks_the_digest() -> None:
    fake = FakeRegistry()
    data = os.urandom(10_000)
    with make_client(fake) as c:
        digest = c.push_blob_stream("app", io.BytesIO(data), chunk_bytes=4096)
        assert digest == sha256_digest(data)
        assert fake.blobs[digest] == data
        assert [m for m, _, _ in fake.log].count("PATCH") == 3
        with pytest.raises(BlobIntegrityError, match="refusing to push"):
            c.push_blob_stream(
                "app", io.BytesIO(b"other"), Digest("sha256:" + "1" * 64), chunk_bytes=4096
            )
        assert not fake.uploads  # the failed upload was cancelled


def test_chunked_upload_resumes_after_a_partly_received_patch() -> None:
    fake = FakeRegistry(partial_patches=1)
    data = os.urandom(10_000)
    with make_client(fake) as c:
        digest = c.push_blob_stream("app", io.BytesIO(data), chunk_bytes=4096)
    assert fake.blobs[digest] == data
    methods = [m for m, _, _ in fake.log]
    assert methods.count("GET") == 1  # one status query after the 416
    assert c.retries == 1


def test_server_ignoring_range_still_yields_the_exact_slice() -> None:
    fake = FakeRegistry(ignore_range=True)
    data = os.urandom(5000)
    fake.blobs[sha256_digest(data)] = data
    with make_client(fake) as c:
        assert c.get_blob_range("app", sha256_digest(data), 10, 20) == data[10:20]


def test_corrupt_whole_blob_is_rejected() -> None:
    fake = FakeRegistry()
    digest = sha256_digest(b"the real bytes")
    fake.blobs[digest] = b"something else"
    with make_client(fake) as c, pytest.raises(BlobIntegrityError, match="corrupt"):
        c.get_blob("app", digest)


def test_missing_blob_and_manifest_are_not_found() -> None:
    fake = FakeRegistry()
    with make_client(fake) as c:
        with pytest.raises(BlobNotFoundError, match=r"not in fake.registry/app"):
            c.blob_size("app", Digest("sha256:" + "2" * 64))
        with pytest.raises(ManifestNotFoundError, match="'v9'"):
            c.get_manifest("app", "v9")
        assert not c.has_blob("app", Digest("sha256:" + "2" * 64))


def test_transient_failures_are_retried_with_exponential_backoff() -> None:
    fake = FakeRegistry(fail_next=[503, 0])
    sleeps: list[float] = []
    data = b"x" * 100
    fake.blobs[sha256_digest(data)] = data
    with make_client(fake, sleeps=sleeps) as c:
        assert c.get_blob("app", sha256_digest(data)) == data
        assert c.retries == 2
    assert sleeps == [0.5, 1.0]


def test_retry_after_is_honoured_up_to_a_bound() -> None:
    sleeps: list[float] = []
    with make_client(FakeRegistry(fail_next=[429], retry_after="2"), sleeps=sleeps) as c:
        c.ping()
    with make_client(FakeRegistry(fail_next=[503], retry_after="3600"), sleeps=sleeps) as c:
        c.ping()
    with make_client(
        FakeRegistry(fail_next=[503], retry_after="Wed, 21 Oct 2015"), sleeps=sleeps
    ) as c:
        c.ping()
    assert sleeps == [2.0, 30.0, 0.5]  # as asked; capped at 30 s; a date: our own backoff


def test_persistent_failure_becomes_registry_unavailable() -> None:
    fake = FakeRegistry(fail_next=[500, 502, 429, 503])
    sleeps: list[float] = []
    with (
        make_client(fake, sleeps=sleeps) as c,
        pytest.raises(RegistryUnavailableError, match="after 3 attempts") as ei,
    ):
        c.ping()
    assert "HTTP 429" in str(ei.value)
    assert sleeps == [0.5, 1.0]
    assert isinstance(ei.value, RegistryUnavailableError)
    assert fake.fail_next == [503]  # three attempts were made, no more


def test_basic_auth_answers_the_challenge_once_then_sends_up_front() -> None:
    fake = FakeRegistry(auth="basic", users={"alice": "pw1"})
    with make_client(fake, Credentials("alice", "pw1")) as c:
        digest = c.push_blob("app", b"data")
        assert c.get_blob("app", digest) == b"data"
    unauthorized = [e for e in fake.log if e[0] == "HEAD"]
    assert len(unauthorized) == 2  # the first HEAD was challenged, then resent with Basic
    assert len(fake.log) == 2 + 1 + 1 + 1  # HEAD x2, POST, PUT, GET


def test_basic_auth_without_or_with_wrong_credentials() -> None:
    fake = FakeRegistry(auth="basic", users={"alice": "pw1"})
    with make_client(fake) as c, pytest.raises(RegistryAuthError, match="auth file"):
        c.ping()
    with (
        make_client(fake, Credentials("alice", "wrong-secret")) as c,
        pytest.raises(RegistryAuthError, match="rejected the credentials") as ei,
    ):
        c.ping()
    assert "wrong-secret" not in str(ei.value)
    assert "wrong-secret" not in repr(Credentials("alice", "wrong-secret"))


def test_bearer_token_is_fetched_per_scope_and_cached() -> None:
    fake = FakeRegistry(auth="bearer", users={"bob": "pw2"})
    with make_client(fake, Credentials("bob", "pw2")) as c:
        digest = c.push_blob("team/app", b"payload")
        for _ in range(3):
            assert c.get_blob_range("team/app", digest, 0, 3) == b"pay"
        scopes = [t.get("scope") for t in fake.token_requests]
    assert scopes == ["repository:team/app:pull", "repository:team/app:pull,push"]
    assert all(t["service"] == "fake" for t in fake.token_requests)


def test_bearer_token_without_access_to_the_repository_is_an_auth_error() -> None:
    fake = FakeRegistry(auth="bearer", allowed_repos={"public"})
    with make_client(fake) as c, pytest.raises(RegistryAuthError, match="denied"):
        c.blob_size("private", Digest("sha256:" + "3" * 64))


def test_manifests_tags_and_index_resolution() -> None:
    fake = FakeRegistry()
    with make_client(fake) as c:
        image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST_MEDIA_TYPE}).encode()
        d_image = c.put_manifest("app", "v1", image)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX_MEDIA_TYPE,
                "manifests": [
                    {
                        "digest": "sha256:" + "4" * 64,
                        "platform": {"os": "linux", "architecture": "arm64"},
                    },
                    {"digest": d_image, "platform": {"os": "linux", "architecture": "amd64"}},
                ],
            }
        ).encode()
        c.put_manifest("app", "multi", index, OCI_INDEX_MEDIA_TYPE)
        got = c.get_manifest("app", "v1")
        assert (got.body, got.digest, got.media_type) == (image, d_image, OCI_MANIFEST_MEDIA_TYPE)
        assert c.get_manifest("app", d_image).body == image
        assert c.resolve_manifest("app", "multi").digest == d_image
        with pytest.raises(ManifestNotFoundError, match="s390x"):
            c.resolve_manifest("app", "multi", architecture="s390x")
        assert c.list_tags("app") == ["multi", "v1"]


def test_docker_schema2_list_and_manifest_are_read() -> None:
    fake = FakeRegistry()
    with make_client(fake) as c:
        image = json.dumps(
            {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_MEDIA_TYPE, "layers": []}
        ).encode()
        d_image = c.put_manifest("lib/app", "amd64", image, DOCKER_MANIFEST_MEDIA_TYPE)
        listing = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_LIST_MEDIA_TYPE,
                "manifests": [
                    {"digest": d_image, "platform": {"os": "linux", "architecture": "amd64"}}
                ],
            }
        ).encode()
        c.put_manifest("lib/app", "latest", listing, DOCKER_LIST_MEDIA_TYPE)
        got = c.resolve_manifest("lib/app", "latest")
        assert (got.media_type, got.digest) == (DOCKER_MANIFEST_MEDIA_TYPE, d_image)
        assert c.get_manifest("lib/app", "latest").is_index


def test_registry_blob_store_passes_the_conformance_check() -> None:
    with make_client(FakeRegistry()) as c:
        check_blob_store(RegistryBlobStore(c, "conformance"))


def test_registry_blob_store_is_a_blob_store() -> None:
    fake = FakeRegistry()
    with make_client(fake) as c:
        store = RegistryBlobStore(c, "app")
        assert store.is_remote and store.supports_ranges
        digest = store.put(io.BytesIO(b"0123456789"))
        assert store.has(digest)
        assert store.size(digest) == 10
        assert store.read(digest, 2, 5) == b"234"
        assert store.read(digest, 0, 10) == b"0123456789"
        with pytest.raises(BlobIntegrityError):
            store.put_bytes(b"abc", Digest("sha256:" + "5" * 64))


def test_auth_file_formats_and_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "auth.json"
    path.write_text(
        encode_auth_file({"https://reg.example:5000/v2/": Credentials("u", "p:with:colons")})
    )
    monkeypatch.setenv("TIDAL_REGISTRY_AUTH", str(path))
    assert load_credentials("reg.example:5000") == Credentials("u", "p:with:colons")
    assert load_credentials("other.example") is None
    creds = parse_auth_file('{"auths": {"h": {"username": "a", "password": "b"}}}', "x")
    assert creds == {"h": Credentials("a", "b")}
    with pytest.raises(ConfigError, match="not base64"):
        parse_auth_file('{"auths": {"h": {"auth": "%%%"}}}', "bad.json")
    with pytest.raises(ConfigError, match='no "auths"'):
        parse_auth_file("{}", "empty.json")
    assert load_credentials("h", tmp_path / "missing.json") is None


def test_www_authenticate_parsing() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    two = parse_www_authenticate('Basic realm="x", Bearer realm="y",error=invalid_token')
    assert [(c.scheme, c.params) for c in two] == [
        ("basic", {"realm": "x"}),
        ("bearer", {"realm": "y", "error": "invalid_token"}),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/tidal/app:v1", ("127.0.0.1:5000", "tidal/app", "v1", None)),
        ("localhost/x", ("localhost", "x", "latest", None)),
        ("nginx", ("docker.io", "library/nginx", "latest", None)),
        ("r.example/a@sha256:" + "a" * 64, ("r.example", "a", None, "sha256:" + "a" * 64)),
    ],
)
def test_reference_parsing(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("bad", ["reg.example/UPPER:tag", "reg.example/:tag", "a/b:bad tag"])
def test_bad_references_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        ImageReference.parse(bad)


def test_plain_http_only_for_loopback_or_listed_registries() -> None:
    assert is_insecure_host("127.0.0.1:5000")
    assert is_insecure_host("localhost:5000")
    assert not is_insecure_host("10.0.0.2:5000")
    assert is_insecure_host("10.0.0.2:5000", ["10.0.0.2:5000"])
    assert not is_insecure_host("registry.example.com")


_NAME = st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+)*", fullmatch=True).filter(lambda n: len(n) < 30)


@settings(max_examples=60, deadline=None)
@given(
    host=st.sampled_from(["127.0.0.1:5000", "reg.example", "localhost", "r.example:443"]),
    parts=st.lists(_NAME, min_size=1, max_size=3),
    tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    digest=st.one_of(st.none(), st.binary(min_size=1, max_size=8).map(sha256_digest)),
)
def test_reference_round_trips(
    host: str, parts: list[str], tag: str | None, digest: Digest | None
) -> None:
    text = (
        host + "/" + "/".join(parts) + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    )
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.digest) == (host, "/".join(parts), digest)
    assert ImageReference.parse(str(ref)) == ref


def test_malformed_manifest_and_tag_list_are_registry_errors() -> None:
    bad = ManifestResponse(OCI_MANIFEST_MEDIA_TYPE, sha256_digest(b"<html>"), b"<html>")
    with pytest.raises(RegistryError, match="not JSON"):
        bad.json()
    fake = FakeRegistry()
    fake.manifests[("app", "v1")] = (OCI_MANIFEST_MEDIA_TYPE, b"[1, 2]")
    with make_client(fake) as c, pytest.raises(RegistryError, match="not a JSON object"):
        c.resolve_manifest("app", "v1").json()
