"""End to end: a Tidal image pushed to the real registry, pulled (metadata only), read lazily."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobs.conftest import REGISTRY_PASSWORD, REGISTRY_USER
from tidal.blobs.auth import Credentials
from tidal.blobs.chunk_cache import ChunkCache
from tidal.blobs.distribution import (
    LazyImage,
    open_pulled_image,
    pull_image,
    push_image,
    read_origin,
)
from tidal.blobs.local_store import LocalBlobStore
from tidal.blobs.pulled import is_pulled_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.errors import FormatError, ImageNotFoundError
from tidal.image.manifest import LAYER_KIND_TRACE, Image, ImageWriter, LayerRecord
from tidal.image.oci import TIDAL_LAYER_MEDIA_TYPE, TIDAL_TRACE_MEDIA_TYPE
from tidal.image.trace import Trace, TraceRange
from tidal.image.writable import WritableLayer
from tidal.testing.oci_images import make_oci_image, skopeo
from tidal.testing.registry_server import RegistryServer

pytestmark = pytest.mark.registry

SIZE = 16 << 20
CHUNK = 64 * 1024
FAST = BlobSettings(retry_attempts=2, backoff_initial_s=0.01)
TRACE = Trace((TraceRange(8, 256), TraceRange(20_000, 64), TraceRange(9_000, 2048)))
"""The start-up trace pushed with the image as its hidden trace layer."""


def build_image(path: Path, work: Path) -> Image:
    """Two layers: 12 MiB of text-like data, then a top layer overwriting scattered sectors."""
    rng = random.Random(7)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)
    ]
    writer = ImageWriter(path, SIZE)
    wl = WritableLayer.create(work / "w1", SIZE)
    for off in range(0, 12 << 20, 1 << 20):
        text = b" ".join(rng.choice(words) for _ in range(200_000))[: 1 << 20]
        wl.write(off, text)
    writer.commit_layer(wl)
    wl.close()
    base = Image(path, writer.write_manifest())
    wl2 = base.writable(work / "w2")
    for _ in range(40):
        wl2.write(rng.randrange(0, SIZE - 4096) // 512 * 512, rng.randbytes(4096))
    writer.commit_layer(wl2, codec="zstd")
    wl2.close()
    trace_blob = TRACE.serialize()
    writer.add_record(
        LayerRecord(
            digest=LocalBlobStore(path).put_bytes(trace_blob),
            size_bytes=len(trace_blob),
            raw_data_bytes=0,
            extent_count=0,
            codec="none",
            chunk_size_bytes=0,
            tail_crc32=0,
            kind=LAYER_KIND_TRACE,
        )
    )
    writer.write_manifest(config={"Cmd": ["/bin/sh"]})
    return Image.open(path)


@pytest.fixture(scope="module")
def pushed(
    registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Image, ImageReference]]:
    tmp = tmp_path_factory.mktemp("img")
    image = build_image(tmp / "image", tmp)
    ref = ImageReference.parse(f"{registry.address}/t/lazy:v1")
    with RegistryClient(registry.address, settings=FAST, load_auth_file=False) as c:
        result = push_image(tmp / "image", ref, c)
    assert result.blobs_uploaded == 4  # two data layers, the trace layer and the config
    yield image, ref


@pytest.fixture
def client(registry: RegistryServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, settings=FAST, load_auth_file=False) as c:
        yield c


def test_lazy_reads_fetch_a_small_fraction_and_match_the_local_image(
    pushed: tuple[Image, ImageReference], client: RegistryClient, tmp_path: Path
) -> None:
    local, ref = pushed
    cache = ChunkCache(tmp_path / "cache", 256 << 20)
    manifest = pull_image(ref, tmp_path / "pulled", client)
    assert manifest == local.manifest
    assert read_origin(tmp_path / "pulled").repository == "t/lazy"
    total = sum(r.size_bytes for r in manifest.layers)
    view = local.merged_view()
    rng = random.Random(1)
    offsets = [rng.randrange(0, SIZE - 8192) for _ in range(20)]
    with LazyImage.from_registry(tmp_path / "pulled", client, cache) as lazy:
        lazy_view = lazy.image.merged_view()
        for off in offsets:
            assert lazy_view.read(off, 8192) == view.read(off, 8192)
        first = lazy.stats
    assert 0 < first.bytes_fetched < total / 4
    assert first.misses > 0
    requests_before = client.requests
    with LazyImage.from_registry(tmp_path / "pulled", client, cache) as again:  # second mount
        lazy_view = again.image.merged_view()
        for off in offsets:
            assert lazy_view.read(off, 8192) == view.read(off, 8192)
        assert again.stats.bytes_fetched == 0
    assert client.requests == requests_before  # not one request: all from the cache


def test_trace_prefetch_fills_the_cache_before_the_reads(
    pushed: tuple[Image, ImageReference], client: RegistryClient, tmp_path: Path
) -> None:
    local, ref = pushed
    cache = ChunkCache(tmp_path / "cache", 256 << 20)
    pull_image(ref, tmp_path / "pulled", client, cache=cache)  # warms the layer tails
    with LazyImage.from_registry(tmp_path / "pulled", client, cache) as lazy:
        assert lazy.stats.bytes_fetched == 0  # tails came from the cache warmed by the pull
        trace = lazy.trace()
        assert trace == TRACE
        plan = lazy.plan_prefetch(trace)
        assert plan and all(rs == list(dict.fromkeys(rs)) for rs in plan.values())
        for pf in lazy.prefetch_trace(concurrency=4):  # the image's own trace layer
            assert pf.wait(30) and pf.errors == []
        after_prefetch = lazy.stats
        assert after_prefetch.prefetched_chunks == sum(len(v) for v in plan.values())
        view, lazy_view = local.merged_view(), lazy.image.merged_view()
        for tr in trace.ranges:
            off, n = tr.lba_sectors * 512, tr.length_sectors * 512
            assert lazy_view.read(off, n) == view.read(off, n)
        assert lazy.stats.requests == after_prefetch.requests  # every read was a hit


def test_open_pulled_image_builds_the_whole_read_path_from_settings(
    pushed: tuple[Image, ImageReference], client: RegistryClient, tmp_path: Path
) -> None:
    local, ref = pushed
    pull_image(ref, tmp_path / "pulled", client)
    assert is_pulled_image(tmp_path / "pulled") and not is_pulled_image(tmp_path)
    cfg = BlobSettings(cache_dir=tmp_path / "node-cache", cache_capacity_bytes=64 << 20)
    with open_pulled_image(tmp_path / "pulled", settings=cfg) as lazy:
        assert lazy.prefetches
        for pf in lazy.prefetches:
            assert pf.wait(30)
        assert lazy.stats.prefetched_chunks > 0  # the image's trace was replayed
        view = lazy.image.merged_view()
        assert view.read(8 * 512, 4096) == local.merged_view().read(8 * 512, 4096)
    assert cfg.chunk_cache().flush(10.0)  # the process's writer of that root publishes them
    assert any((tmp_path / "node-cache" / "entries").iterdir())


def test_skopeo_inspects_and_copies_the_tidal_image(
    pushed: tuple[Image, ImageReference],
    registry: RegistryServer,
    auth_registry: RegistryServer,
    tmp_path: Path,
) -> None:
    local, ref = pushed
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert [layer["mediaType"] for layer in raw["layers"]] == [TIDAL_LAYER_MEDIA_TYPE] * 2 + [
        TIDAL_TRACE_MEDIA_TYPE
    ]
    assert [layer["digest"] for layer in raw["layers"]] == [r.digest for r in local.manifest.layers]
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"{REGISTRY_USER}:{REGISTRY_PASSWORD}",
        f"docker://{ref}",
        f"docker://{auth_registry.address}/t/copied:v1",
    )
    creds = Credentials(REGISTRY_USER, REGISTRY_PASSWORD)
    with RegistryClient(auth_registry.address, credentials=creds, settings=FAST) as c:
        copied = pull_image(
            ImageReference.parse(f"{auth_registry.address}/t/copied:v1"), tmp_path / "c", c
        )
        assert copied == local.manifest
        with LazyImage.from_registry(tmp_path / "c", c, None) as lazy:
            assert lazy.image.merged_view().read(1 << 20, 4096) == local.merged_view().read(
                1 << 20, 4096
            )


def test_full_pull_makes_an_ordinary_local_image(
    pushed: tuple[Image, ImageReference], client: RegistryClient, tmp_path: Path
) -> None:
    local, ref = pushed
    pull_image(ref, tmp_path / "full", client, with_blobs=True)
    full = Image.open(tmp_path / "full")  # local blob files, no registry involved
    assert full.verify() > 0
    assert full.merged_view().read(3 << 20, 8192) == local.merged_view().read(3 << 20, 8192)


def test_pulling_an_ordinary_oci_image_says_convert_it(
    client: RegistryClient, tmp_path: Path
) -> None:
    image = make_oci_image({"a": b"b"})
    for blob in (*image.layers.values(), image.config):
        client.push_blob("t/plain", blob)
    client.put_manifest("t/plain", "v1", image.manifest)
    ref = ImageReference.parse(f"{client.registry}/t/plain:v1")
    with pytest.raises(FormatError, match="convert"):
        pull_image(ref, tmp_path / "x", client)
    with pytest.raises(ImageNotFoundError, match="pull it"):
        read_origin(tmp_path)
