"""Hot images: the node's image cache. An image's shared mount outlives its last container
(so the next one starts without a mount) until the LRU limit, the idle timeout or the
engine's close releases it; on the fake mounter and runtime, no root needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidal.engine.containers import Engine
from tidal.engine.rootfs import lower_mountpoint
from tidal.engine.spec import ContainerSpec
from tidal.engine.state import TIDAL_IMAGE
from tidal.image.manifest import EXACT_ROOT_ANNOTATION, MANIFEST_FORMAT, ImageManifest
from tidal.testing.engine import FakeMounter, FakeNetwork, fake_engine


def tidal_image(path: Path) -> Path:
    """A Tidal image directory as the engine sees it (the fake mounter does not read layers)."""
    path.mkdir(parents=True)
    manifest = ImageManifest(
        size_bytes=1 << 20,
        layers=(),
        format=MANIFEST_FORMAT,
        annotations={EXACT_ROOT_ANNOTATION: "true"},
    )
    (path / "manifest.json").write_text(manifest.to_json())
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def engine(tmp_path: Path, mounter: FakeMounter, clock: Clock, **settings: Any) -> Engine:
    eng: Engine = fake_engine(
        tmp_path, mounter=mounter, network=FakeNetwork(tmp_path / "host"), **settings
    )
    eng.storage._clock = clock
    return eng


def image_mounts(mounter: FakeMounter) -> set[str]:
    return {t for t, m in mounter.table().items() if m["type"] == TIDAL_IMAGE}


def run_and_remove(eng: Engine, image: Path) -> None:
    rec = eng.run(ContainerSpec(image=str(image), command=("true",)))
    eng.wait(rec.id, timeout_s=10)
    eng.remove(rec.id, force=True)


def test_a_hot_image_outlives_its_last_container_and_is_reused(tmp_path: Path) -> None:
    mounter, clock = FakeMounter(tmp_path / "host"), Clock()
    eng = engine(tmp_path, mounter, clock, hot_images=2, hot_image_idle_s=60)
    try:
        img = tidal_image(tmp_path / "img-a")
        mp = str(lower_mountpoint(eng.images_dir, str(img)))
        run_and_remove(eng, img)
        assert image_mounts(mounter) == {mp}  # kept hot, no container uses it
        assert eng.storage.hot_image_mounts() == [mp]
        made = mounter.made.get(TIDAL_IMAGE, 0)
        run_and_remove(eng, img)  # the next container of the image mounts nothing
        assert mounter.made.get(TIDAL_IMAGE, 0) == made
        clock.now += 61  # idle past the timeout: the daemon's beat releases it
        assert eng.storage.trim_hot_images() == [mp]
        assert image_mounts(mounter) == set()
    finally:
        eng.close()


def test_least_recently_used_go_beyond_the_limit_and_close_releases_the_rest(
    tmp_path: Path,
) -> None:
    mounter, clock = FakeMounter(tmp_path / "host"), Clock()
    eng = engine(tmp_path, mounter, clock, hot_images=2, hot_image_idle_s=0)
    imgs = [tidal_image(tmp_path / f"img-{i}") for i in range(3)]
    mps = [str(lower_mountpoint(eng.images_dir, str(i))) for i in imgs]
    try:
        for img in imgs:
            clock.now += 1
            run_and_remove(eng, img)
        assert image_mounts(mounter) == set(mps[1:])  # img-0, the least recently used, went
        # an image in use is never released, whatever the limit
        rec = eng.run(ContainerSpec(image=str(imgs[1]), command=("sleep", "30")))
        assert eng.storage.hot_image_mounts() == [mps[2]]
        assert eng.storage.trim_hot_images(keep=0) == [mps[2]]
        assert image_mounts(mounter) == {mps[1]}
        eng.remove(rec.id, force=True)
    finally:
        eng.close()
    assert image_mounts(mounter) == set()  # what no container uses goes with the engine


def test_a_restarted_engine_keeps_unrecorded_image_mounts_hot_up_to_the_limit(
    tmp_path: Path,
) -> None:
    mounter, clock = FakeMounter(tmp_path / "host"), Clock()
    first = engine(tmp_path, mounter, clock, hot_images=3)
    imgs = [tidal_image(tmp_path / f"img-{i}") for i in range(3)]
    for img in imgs:
        run_and_remove(first, img)
    assert len(image_mounts(mounter)) == 3
    first.storage._idle.clear()  # a SIGKILLed daemon: nothing in memory, the mounts stay
    first.close()
    second = engine(tmp_path, mounter, clock, hot_images=1)
    try:
        second.reconcile(wait_s=0)
        assert len(image_mounts(mounter)) == 1  # adopted as hot up to the limit
        assert second.storage.hot_image_mounts() == sorted(image_mounts(mounter))
    finally:
        second.close()
    assert image_mounts(mounter) == set()


def test_hot_images_zero_releases_with_the_last_user(tmp_path: Path) -> None:
    mounter, clock = FakeMounter(tmp_path / "host"), Clock()
    eng = engine(tmp_path, mounter, clock, hot_images=0)
    try:
        run_and_remove(eng, tidal_image(tmp_path / "img"))
        assert image_mounts(mounter) == set()
    finally:
        eng.close()
