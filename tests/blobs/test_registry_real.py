"""The registry client against the real CNCF registry, with skopeo as an independent client."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobs.conftest import REGISTRY_PASSWORD, REGISTRY_USER
from tidal.blobs.auth import Credentials, encode_auth_file
from tidal.blobs.distribution import fetch_oci_image
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryBlobStore, RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.blockdev.builder import convert_oci
from tidal.blockdev.oci_archive import open_source_image
from tidal.errors import (
    BlobNotFoundError,
    ConfigError,
    ManifestNotFoundError,
    RegistryAuthError,
    RegistryError,
)
from tidal.ids import Digest, sha256_digest
from tidal.image.manifest import Image
from tidal.image.oci import DOCKER_MANIFEST_MEDIA_TYPE
from tidal.testing.blob_conformance import check_blob_store
from tidal.testing.oci_images import layer_files, make_oci_image, skopeo, write_oci_layout
from tidal.testing.registry_server import RegistryServer, TokenAuth
from tidal.testing.token_server import ISSUER as TOKEN_ISSUER
from tidal.testing.token_server import SERVICE as TOKEN_SERVICE
from tidal.testing.token_server import TokenServer

pytestmark = pytest.mark.registry

FAST = BlobSettings(retry_attempts=2, backoff_initial_s=0.01, upload_chunk_bytes=64 * 1024)


@pytest.fixture
def client(registry: RegistryServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, settings=FAST, load_auth_file=False) as c:
        yield c


def test_ping_blobs_ranges_and_chunked_upload(client: RegistryClient) -> None:
    client.ping()
    data = os.urandom(300_000)
    digest = client.push_blob_stream("t/blobs", io.BytesIO(data))  # 5 PATCH chunks of 64 KiB
    assert digest == sha256_digest(data)
    assert client.blob_size("t/blobs", digest) == len(data)
    assert client.get_blob("t/blobs", digest) == data
    assert client.get_blob_range("t/blobs", digest, 65_530, 131_080) == data[65_530:131_080]
    small = client.push_blob("t/blobs", b"monolithic")
    assert client.get_blob("t/blobs", small) == b"monolithic"
    with pytest.raises(BlobNotFoundError):
        client.blob_size("t/blobs", Digest("sha256:" + "9" * 64))
    with pytest.raises(ManifestNotFoundError):
        client.get_manifest("t/blobs", "nope")


def test_registry_store_passes_the_conformance_check(client: RegistryClient) -> None:
    check_blob_store(RegistryBlobStore(client, "t/conformance"))


def test_registry_store_reads_ranges(client: RegistryClient) -> None:
    store = RegistryBlobStore(client, "t/store")
    digest = store.put_bytes(b"abcdefghij" * 1000)
    assert store.read(digest, 5, 15) == b"fghijabcde"
    assert store.size(digest) == 10_000


def test_image_pushed_by_tidal_is_read_by_skopeo(
    client: RegistryClient, registry: RegistryServer, tmp_path: Path
) -> None:
    image = make_oci_image({"etc/hello": b"hello from tidal\n", "bin/tool": os.urandom(4096)})
    for layer in image.layers.values():
        client.push_blob("t/pushed", layer)
    client.push_blob("t/pushed", image.config)
    client.put_manifest("t/pushed", "v1", image.manifest)
    ref = f"docker://{registry.address}/t/pushed:v1"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", ref)
    assert raw.encode() == image.manifest
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'out'}:v1")
    layout = tmp_path / "out" / "blobs" / "sha256"
    ((digest, layer),) = image.layers.items()
    assert layer_files((layout / digest.split(":")[1]).read_bytes()) == image.files
    assert client.list_tags("t/pushed") == ["v1"]


def test_image_pushed_by_skopeo_is_pulled_by_tidal(
    client: RegistryClient, registry: RegistryServer, tmp_path: Path
) -> None:
    image = make_oci_image({"app/main.py": b"print('ready')\n"})
    write_oci_layout(tmp_path / "layout", image, "v2")
    dest = f"docker://{registry.address}/t/from-skopeo:v2"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v2", dest)
    m = client.resolve_manifest("t/from-skopeo", "v2")
    doc = m.json()
    config = client.get_blob("t/from-skopeo", Digest(doc["config"]["digest"]))
    assert json.loads(config)["rootfs"]["type"] == "layers"
    (layer_desc,) = doc["layers"]
    layer = client.get_blob("t/from-skopeo", Digest(layer_desc["digest"]))
    assert layer_files(layer) == image.files


def test_basic_auth_against_the_real_registry(auth_registry: RegistryServer) -> None:
    good = Credentials(REGISTRY_USER, REGISTRY_PASSWORD)
    with RegistryClient(auth_registry.address, credentials=good, settings=FAST) as c:
        c.ping()
        digest = c.push_blob("t/private", b"secret layer")
        assert c.get_blob("t/private", digest) == b"secret layer"
    with (
        RegistryClient(auth_registry.address, settings=FAST, load_auth_file=False) as c,
        pytest.raises(RegistryAuthError, match="user name and password"),
    ):
        c.get_blob("t/private", digest)
    bad = Credentials(REGISTRY_USER, "not-the-password")
    with (
        RegistryClient(auth_registry.address, credentials=bad, settings=FAST) as c,
        pytest.raises(RegistryAuthError, match="rejected") as ei,
    ):
        c.ping()
    assert "not-the-password" not in str(ei.value)


def test_auth_file_is_shared_with_skopeo(
    auth_registry: RegistryServer,
    registry: RegistryServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One auth.json serves Tidal and skopeo; skopeo copies a Tidal-pushed image across registries."""
    authfile = tmp_path / "auth.json"
    authfile.write_text(
        encode_auth_file({auth_registry.address: Credentials(REGISTRY_USER, REGISTRY_PASSWORD)})
    )
    monkeypatch.setenv("TIDAL_REGISTRY_AUTH", str(authfile))
    image = make_oci_image({"x": b"y"})
    with RegistryClient(registry.address, settings=FAST) as c:
        for blob in (*image.layers.values(), image.config):
            c.push_blob("t/cross", blob)
        c.put_manifest("t/cross", "v1", image.manifest)
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--dest-authfile",
        str(authfile),
        f"docker://{registry.address}/t/cross:v1",
        f"docker://{auth_registry.address}/t/cross:v1",
    )
    with RegistryClient(auth_registry.address, settings=FAST) as c:  # credentials from the file
        assert c.get_manifest("t/cross", "v1").body == image.manifest


def test_ordinary_image_fetched_into_an_oci_layout_for_convert(
    client: RegistryClient, registry: RegistryServer, tmp_path: Path
) -> None:
    """skopeo pushes a plain OCI image; Tidal fetches it into a layout that skopeo and the
    converter's parser both read (the input of `tidal image convert` from a registry)."""
    image = make_oci_image({"etc/os-release": b"ID=tidal\n", "srv/data": os.urandom(20_000)})
    write_oci_layout(tmp_path / "src", image, "v3")
    ref = f"{registry.address}/t/plain-src:v3"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'src'}:v3", f"docker://{ref}")
    layout = fetch_oci_image(ImageReference.parse(ref), tmp_path / "fetched", client)
    inspected = json.loads(skopeo("inspect", f"oci:{layout}:v3"))
    assert inspected["Layers"] == list(image.layers)
    parsed = open_source_image(layout)
    assert [la.digest for la in parsed.layers] == list(image.layers)
    assert parsed.config["rootfs"]["type"] == "layers"
    before = LocalBlobStore(layout).digests()
    fetch_oci_image(ImageReference.parse(ref), layout, client)  # again: nothing re-downloaded
    assert LocalBlobStore(layout).digests() == before


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.loop
def test_convert_reads_an_image_fetched_from_the_registry(
    client: RegistryClient, registry: RegistryServer, tmp_path: Path
) -> None:
    image = make_oci_image({"hello.txt": b"converted from a registry\n"})
    for blob in (*image.layers.values(), image.config):
        client.push_blob("t/to-convert", blob)
    client.put_manifest("t/to-convert", "v1", image.manifest)
    ref = ImageReference.parse(f"{registry.address}/t/to-convert:v1")
    layout = fetch_oci_image(ref, tmp_path / "layout", client)
    result = convert_oci(layout, tmp_path / "tidal-image")
    (layer,) = result.manifest.data_layers
    assert layer.source_digest == next(iter(image.layers))
    assert Image.open(tmp_path / "tidal-image").verify() > 0


def test_docker_schema2_image_pushed_by_skopeo_is_fetched(
    client: RegistryClient, registry: RegistryServer, tmp_path: Path
) -> None:
    image = make_oci_image({"usr/bin/app": b"#!/bin/sh\necho ready\n"})
    write_oci_layout(tmp_path / "src", image, "v1")
    ref = f"{registry.address}/t/docker-format:v1"
    skopeo(
        "copy", "--format", "v2s2", "--dest-tls-verify=false",
        f"oci:{tmp_path / 'src'}:v1", f"docker://{ref}",
    )  # fmt: skip
    m = client.resolve_manifest("t/docker-format", "v1")
    assert m.media_type == DOCKER_MANIFEST_MEDIA_TYPE
    layout = fetch_oci_image(ImageReference.parse(ref), tmp_path / "fetched", client)
    parsed = open_source_image(layout)
    (layer,) = parsed.layers
    assert layer_files(LocalBlobStore(layout).read(Digest(layer.digest), 0, layer.size_bytes)) == (
        image.files
    )


def test_tls_registry_with_a_private_ca(tmp_path: Path) -> None:
    with RegistryServer(tls=True, users={REGISTRY_USER: REGISTRY_PASSWORD}) as server:
        creds = Credentials(REGISTRY_USER, REGISTRY_PASSWORD)
        trusted = BlobSettings(ca_file=server.ca_file, retry_attempts=2)
        with RegistryClient(server.address, credentials=creds, settings=trusted) as c:
            assert c.base_url.startswith("http://")  # loopback defaults to plain HTTP...
        with RegistryClient(
            server.address, credentials=creds, settings=trusted, scheme="https"
        ) as c:  # ...so a TLS registry on loopback is asked for explicitly
            digest = c.push_blob("t/tls", b"over tls")
            assert c.get_blob("t/tls", digest) == b"over tls"
        with (
            RegistryClient(server.address, credentials=creds, settings=FAST, scheme="https") as c,
            pytest.raises(RegistryError, match=r"not trusted.*ca_file"),
        ):
            c.ping()
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate")
        with pytest.raises(ConfigError, match="ca_file"):
            RegistryClient(server.address, settings=BlobSettings(ca_file=bad))


def test_bearer_token_auth_against_the_real_registry(tmp_path: Path) -> None:
    tokens = TokenServer(tmp_path, {"alice": "pw-a"}, {"alice": {"t/team"}})
    try:
        auth = TokenAuth(tokens.realm, TOKEN_SERVICE, TOKEN_ISSUER, tokens.cert)
        patient = BlobSettings(retry_attempts=4, backoff_initial_s=0.1)  # openssl per token
        with RegistryServer(token_auth=auth) as server:
            alice = Credentials("alice", "pw-a")
            with RegistryClient(server.address, credentials=alice, settings=patient) as c:
                digest = c.push_blob("t/team", b"bearer")
                for _ in range(3):
                    assert c.get_blob_range("t/team", digest, 1, 4) == b"ear"
                with pytest.raises(RegistryAuthError):
                    c.push_blob("t/other-team", b"not granted")
            scopes = [r.get("scope") for r in tokens.requests]
            assert scopes.count("repository:t/team:pull") == 1  # fetched once, then cached
            # the registry's challenge lists the actions in Go map order: compare as sets
            actions = [set(sc.rsplit(":", 1)[1].split(",")) for sc in scopes if "t/team:" in sc]
            assert {"pull", "push"} in actions, scopes
            stranger = Credentials("mallory", "guess")
            with (
                RegistryClient(server.address, credentials=stranger, settings=FAST) as c,
                pytest.raises(RegistryAuthError, match="refused user 'mallory'"),
            ):
                c.get_blob("t/team", digest)
    finally:
        tokens.close()
