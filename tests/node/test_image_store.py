"""The node's image store against the real CNCF registry, with images the real builder made.

The registry's own access log counts what was uploaded and fetched: a v2 image on the same
base uploads and fetches only its new layer, and the two images share the base's chunk-cache
entries. Pulls are metadata only, concurrent pulls are safe, removal collects what no stored
image needs, and each error is one line naming the reference and the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import open_pulled_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.blockdev.builder import convert_oci
from tidal.errors import (
    ConfigError,
    ImageInUseError,
    ImageReferenceNotFoundError,
    RegistryUnavailableError,
)
from tidal.image.manifest import Image
from tidal.node.images import ImageStore, StoredImage
from tidal.node.references import looks_like_path
from tidal.testing.oci_builder import base_and_update_layouts
from tidal.testing.registry_server import RegistryServer, free_port

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop, pytest.mark.registry]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tidal images of v1 = [base] and v2 = [base, update], converted by the real builder."""
    work = tmp_path_factory.mktemp("images")
    v1, v2 = base_and_update_layouts(work / "src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_DATA_ROOT", str(work / "data"))
        return convert_oci(v1, work / "v1").image_dir, convert_oci(v2, work / "v2").image_dir


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    with RegistryServer(access_log=True) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(tmp_path / "data"))
    return ImageStore(settings=BlobSettings(cache_dir=tmp_path / "chunks"))


def _push(image: Path, ref: str) -> None:
    with RegistryClient(ref.split("/", 1)[0]) as client:
        push_image(image, ImageReference.parse(ref), client)


def _read_everything(stored: StoredImage, settings: BlobSettings) -> None:
    """Read the whole device lazily, as a container reading every file would."""
    with open_pulled_image(stored.path, settings=settings, prefetch=False) as lazy:
        view = lazy.image.merged_view()
        step = 8 << 20
        for offset in range(0, view.size_bytes, step):
            view.read(offset, min(step, view.size_bytes - offset))


def test_v2_on_the_same_base_pushes_and_fetches_only_its_new_layer(
    images: tuple[Path, Path], registry: RegistryServer, store: ImageStore
) -> None:
    v1_dir, v2_dir = images
    base, top = (r.digest for r in Image.open(v2_dir).manifest.data_layers)
    assert Image.open(v1_dir).manifest.data_layers[0].digest == base

    _push(v1_dir, f"{registry.address}/app:v1")
    assert registry.blob_uploads() == 2  # the base layer and the config
    _push(v2_dir, f"{registry.address}/app:v2")
    assert registry.blob_uploads() == 4  # + the new layer and v2's config, not the base
    uploads = [p for m, p, s in registry.requests() if m == "PUT" and "/blobs/uploads/" in p]
    # the digest rides in the final PUT's query string (URL-encoded ':'), so match its hex
    assert sum(base[7:] in p for p in uploads) == 1 and sum(top[7:] in p for p in uploads) == 1

    v1 = store.pull(f"{registry.address}/app:v1")
    assert not (v1.path / "blobs").exists()  # metadata only
    assert store.fetched_bytes(v1) < v1.stored_bytes // 10  # the layer tails, no data yet
    _read_everything(v1, store.settings)
    base_fetches = registry.blob_fetches(base)
    assert base_fetches > 0
    cache = ChunkCache(store.settings.resolved_cache_dir(), store.settings.cache_capacity_bytes)
    base_cached = cache.blob_bytes(base)
    assert base_cached > 0

    v2 = store.pull(f"{registry.address}/app:v2")
    _read_everything(v2, store.settings)
    assert registry.blob_fetches(base) == base_fetches  # the base came from the shared cache
    assert registry.blob_fetches(top) > 0
    assert cache.blob_bytes(base) == base_cached  # one copy of the base's chunks
    assert store.fetched_bytes(v2) == base_cached + cache.blob_bytes(top)

    # removal: v1 goes, but its layer is v2's base, so its chunks stay
    assert store.remove(f"{registry.address}/app:v1").cache_entries_removed == 0
    assert cache.blob_bytes(base) == base_cached and not v1.path.exists()
    gone = store.remove(f"{registry.address}/app:v2")
    assert gone.directory_removed and gone.cache_entries_removed > 0
    assert cache.blob_bytes(base) == 0 and cache.blob_bytes(top) == 0
    assert store.list() == []


def test_pull_policies_and_in_use_refusal(
    images: tuple[Path, Path], registry: RegistryServer, store: ImageStore
) -> None:
    ref = f"{registry.address}/app:v1"
    _push(images[0], ref)

    def manifest_gets() -> int:
        return sum(
            1 for m, p, _ in registry.requests() if m in ("GET", "HEAD") and "/manifests/" in p
        )

    with pytest.raises(ImageReferenceNotFoundError, match="--pull never forbids"):
        store.resolve(ref, "never")
    first = store.resolve(ref, "missing")  # pulls
    n = manifest_gets()
    assert store.resolve(ref, "missing") == first  # on the node: no registry request
    assert store.resolve(ref, "never") == first
    assert manifest_gets() == n
    again = store.resolve(ref, "always")
    assert manifest_gets() > n and again.path == first.path
    with pytest.raises(ConfigError, match="unknown pull policy 'sometimes'"):
        store.resolve(ref, "sometimes")

    # a second reference to the same manifest: untagging it keeps the image
    _push(images[0], f"{registry.address}/other:latest")
    store.pull(f"{registry.address}/other:latest")
    assert not store.remove(f"{registry.address}/other:latest").directory_removed
    with pytest.raises(ImageInUseError, match=r"used by container\(s\) web, db; .*--force"):
        store.remove(ref, users=["web", "db"])
    assert store.get(ref).path.is_dir()
    assert store.remove(ref, users=["web"], force=True).directory_removed
    with pytest.raises(ImageReferenceNotFoundError, match="not on this node; pull it"):
        store.get(ref)


def test_errors_name_the_reference_and_the_fix(registry: RegistryServer, store: ImageStore) -> None:
    with pytest.raises(ImageReferenceNotFoundError, match=r"app:nope is not in its registry"):
        store.pull(f"{registry.address}/app:nope")
    dead = f"127.0.0.1:{free_port()}"
    offline = ImageStore(
        store.root,
        BlobSettings(cache_dir=store.settings.cache_dir, retry_attempts=1, backoff_initial_s=0),
    )
    with pytest.raises(RegistryUnavailableError, match=dead):
        offline.pull(f"{dead}/app:v1")
    assert store.list() == [] and not any((store.root / "tmp").glob("*"))


def test_concurrent_pulls_store_each_image_once(
    images: tuple[Path, Path], registry: RegistryServer, store: ImageStore
) -> None:
    refs = [f"{registry.address}/app:v1", f"{registry.address}/app:v2"]
    _push(images[0], refs[0])
    _push(images[1], refs[1])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: store.pull(refs[i % 2]), range(8)))
    assert len({r.path for r in results}) == 2
    assert [i.reference for i in store.list()] == sorted(refs)
    assert len(list((store.root / "sha256").iterdir())) == 2
    assert not any((store.root / "tmp").iterdir())
    # processes too: each its own interpreter, one lock file
    env = {**os.environ, "TIDAL_DATA_ROOT": str(store.root.parent)}
    code = "from tidal.node.images import ImageStore; import sys; ImageStore().pull(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, refs[i % 2]], env=env) for i in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    assert [i.reference for i in store.list()] == sorted(refs)


def test_cli_pull_images_rmi(
    images: tuple[Path, Path], registry: RegistryServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TIDAL_DATA_ROOT": str(tmp_path / "data"),
        "TIDAL_BLOBS__CACHE_DIR": str(tmp_path / "chunks"),
    }

    def tidal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    ref = f"{registry.address}/app:v2"
    _push(images[1], ref)
    pulled = tidal("pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{ref}: sha256:" in pulled.stdout and "2 layers" in pulled.stdout
    listed = tidal("images", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["reference"] == ref and row["layers"] == 2 and row["used_by"] == []
    assert row["stored_bytes"] == sum(r.size_bytes for r in Image.open(images[1]).manifest.layers)
    table = tidal("images").stdout
    assert "REFERENCE" in table and ref in table
    assert tidal("images", "-q").stdout.split() == [ref]
    for args, needle in (
        (("rmi", f"{registry.address}/app:zzz"), "is not on this node; pull it with"),
        (("pull", f"{registry.address}/app:zzz"), "is not in its registry"),
    ):
        bad = tidal(*args)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
        assert bad.stderr.startswith("error: ") and needle in bad.stderr, bad.stderr
    bad_policy = tidal("run", "--pull", "sometimes", ref, "--", "true")
    assert bad_policy.returncode == 1 and bad_policy.stderr.count("\n") == 1
    assert "unknown pull policy 'sometimes'; use missing, always, never" in bad_policy.stderr
    removed = tidal("rmi", ref)
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    assert json.loads(tidal("images", "--json").stdout) == []


def test_references_and_directories_are_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    assert looks_like_path("img") and looks_like_path("/no/such/dir") and looks_like_path("./x")
    assert not looks_like_path("127.0.0.1:5000/web:v1") and not looks_like_path("team/app:v1")


def test_a_reference_without_a_registry_uses_the_node_s_embedded_store(
    images: tuple[Path, Path], store: ImageStore
) -> None:
    from tidal.blobs.registries import LocalRegistry

    with LocalRegistry(store.settings.resolved_store_dir()) as local:
        push_image(images[0], ImageReference.parse("team/app:v1", default_registry="local"), local)
    stored = store.pull("team/app:v1")
    assert stored.reference == "local/team/app:v1"
    assert store.resolve("team/app:v1", "never") == stored
    assert store.fetched_bytes(stored) == 0  # its blobs are on the node already: no cache
    assert store.remove("team/app:v1").directory_removed
