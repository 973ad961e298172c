"""Which registry a reference goes to, and the embedded local store that needs none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidal.blobs.reference import ImageReference, names_registry
from tidal.blobs.registries import LocalRegistry, connect, resolve_reference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.errors import BlobIntegrityError, ManifestNotFoundError, RegistryError
from tidal.ids import sha256_digest


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("127.0.0.1:5000/app:v1", True),
        ("localhost/app", True),
        ("reg.example/team/app@sha256:" + "a" * 64, True),
        ("docker://reg.example/app", True),
        ("app:v1", False),
        ("team/app", False),
        ("app", False),
    ],
)
def test_names_registry_follows_dockers_rule(text: str, named: bool) -> None:
    assert names_registry(text) is named


def test_bare_references_go_to_the_default_registry_or_the_local_store(tmp_path: Path) -> None:
    local = resolve_reference("team/app:v1", BlobSettings())
    assert (local.registry, local.repository, local.tag) == ("local", "team/app", "v1")
    conf = resolve_reference("app", BlobSettings(default_registry="reg.example:5000"))
    assert (conf.registry, conf.repository, conf.tag) == ("reg.example:5000", "app", "latest")
    explicit = resolve_reference("127.0.0.1:1/app:v2", BlobSettings(default_registry="x.y"))
    assert explicit.registry == "127.0.0.1:1"
    # docker.io keeps its library/ convention when asked for explicitly
    assert ImageReference.parse("app").repository == "library/app"


def test_connect_picks_the_local_store_or_a_registry_client(tmp_path: Path) -> None:
    settings = BlobSettings(store_dir=tmp_path / "store")
    local = connect("local", settings)
    assert isinstance(local, LocalRegistry) and local.root == tmp_path / "store"
    assert isinstance(connect(local.registry, settings), LocalRegistry)
    remote = connect("127.0.0.1:5000", settings)
    try:
        assert isinstance(remote, RegistryClient)
    finally:
        remote.close()


def test_local_store_keeps_manifests_by_tag_and_digest(tmp_path: Path) -> None:
    store = LocalRegistry(tmp_path)
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    ).encode()
    digest = store.put_manifest("team/app", "v1", body)
    assert digest == sha256_digest(body)
    by_tag = store.resolve_manifest("team/app", "v1")
    by_digest = store.resolve_manifest("team/app", digest)
    assert by_tag == by_digest and by_tag.body == body
    newer = body.replace(b"}", b', "annotations": {}}')
    store.put_manifest("team/app", "v1", newer)  # a tag moves to the newest push
    assert store.resolve_manifest("team/app", "v1").body == newer
    with pytest.raises(ManifestNotFoundError, match="no image team/app:v2"):
        store.resolve_manifest("team/app", "v2")
    with pytest.raises(RegistryError, match="not a valid tag"):
        store.put_manifest("team/app", "../escape", body)


def test_local_store_detects_a_corrupt_manifest(tmp_path: Path) -> None:
    store = LocalRegistry(tmp_path)
    body = b'{"schemaVersion": 2}'
    digest = store.put_manifest("app", "v1", body)
    path = store.blob_store("app").path(digest)
    path.chmod(0o644)
    path.write_bytes(b'{"schemaVersion": 3}')
    with pytest.raises(BlobIntegrityError):
        store.resolve_manifest("app", "v1")
