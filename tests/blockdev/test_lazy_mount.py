"""Lazy mounts of pulled images, end to end: the real CNCF registry, FUSE, loop, ext4.

An image is built from a small tree with a few incompressible files, pushed to a registry
started for this module, pulled (metadata only) and mounted: reads must fetch only what they
touch, a second mount must read from the chunk cache without any request, a recorded trace
must be prefetched on a cold mount, a registry that goes away must turn reads into EIO with
a log line (the server living on), and a dead server must be recoverable by mounting again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image
from tidal.blobs.distribution import pull_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registries import LocalRegistry, connect
from tidal.blobs.registry_client import RegistryClient
from tidal.blockdev import loop, mounts
from tidal.blockdev.record import record_trace
from tidal.image.manifest import LAYER_KIND_TRACE, Image, attach_trace
from tidal.testing.registry_server import RegistryServer

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.loop, pytest.mark.registry]

FILES = {f"/big/{name}.bin": os.urandom(3 << 20) for name in ("a", "b", "c", "d")}
TOTAL_BIG = sum(len(v) for v in FILES.values())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox tree plus four 3 MiB random files, as a one-layer image."""
    return build_sample_image(tmp_path_factory.mktemp("lazy-src"), FILES)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cold chunk cache of this test's own; the FUSE server reads the env setting."""
    path = tmp_path / "chunks"
    monkeypatch.setenv("TIDAL_BLOBS__CACHE_DIR", str(path))
    return path


@contextlib.contextmanager
def mounted(image_dir: Path, target: Path) -> Iterator[mounts.MountInfo]:
    """Mount, and unmount at the end whatever happens (leaving nothing is part of the test)."""
    info = mounts.mount_image(image_dir, target)
    try:
        yield info
    finally:
        mounts.unmount(target, force=True)


def _push_pull(image: Path, registry: RegistryServer, tag: str, dest: Path) -> Path:
    ref = ImageReference.parse(f"{registry.address}/lazy/img:{tag}")
    with RegistryClient(registry.address) as client:
        push_image(image, ref, client)
        pull_image(ref, dest, client)
    return dest


def _stats(target: Path) -> dict:
    """The server's statistics, fresh (it rewrites them every second)."""
    path = mounts.find_mount(target).run_dir / mounts.STATS_FILE
    before = path.stat().st_mtime_ns if path.exists() else 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.1)
    return mounts.image_stats(target)


def _fetched(target: Path) -> int:
    return int(_stats(target)["lazy"]["total"]["bytes_fetched"])


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_pulled_image_reads_only_what_it_touches_and_is_byte_exact(
    image: Path, registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    pulled = _push_pull(image, registry, "v1", tmp_path / "pulled")
    assert not (pulled / "blobs").exists()  # metadata only
    target = tmp_path / "mnt"
    stored = sum(r.size_bytes for r in Image.open(pulled).manifest.layers)
    with mounted(pulled, target):
        assert (target / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        after_one = _fetched(target)
        # one 3 MiB file out of 12 MiB of random data (plus metadata): well under half
        assert 3 << 20 <= after_one < stored * 0.5, (after_one, stored)
        for rel, data in FILES.items():
            assert (target / rel.lstrip("/")).read_bytes() == data
        doc = _stats(target)
    assert doc["server_alive"] and doc["fuse"]["errors"] == 0
    assert doc["lazy"]["total"]["bytes_fetched"] >= TOTAL_BIG
    assert doc["lazy"]["total"]["check_failures"] == 0


def _metrics(target: Path, name: str, at_least: float) -> dict[str, float]:
    """Samples of ``name`` from the mount's ``metrics.prom``, once its value reaches ``at_least``
    (the stats writer rewrites the file every second, after the mount is ready)."""
    from prometheus_client.parser import text_string_to_metric_families

    path = mounts.find_mount(target).run_dir / "metrics.prom"
    deadline = time.monotonic() + 10
    samples: dict[str, float] = {}
    while time.monotonic() < deadline:
        if path.exists():
            samples = {
                s.name + str(sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(path.read_text())
                for s in fam.samples
                if s.name == name
            }
            if samples and max(samples.values()) >= at_least:
                return samples
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached {at_least} in {path}: {samples}")


def test_a_lazy_mount_exports_prometheus_metrics_after_ready(
    image: Path, registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    pulled = _push_pull(image, registry, "metrics", tmp_path / "pulled")
    target = tmp_path / "mnt"
    with mounted(pulled, target):
        assert (target / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        fetched = _metrics(target, "tidal_mount_fetched_bytes_total", 3 << 20)
        assert list(fetched) == [f"tidal_mount_fetched_bytes_total[('image', '{pulled}')]"]
        reads = _metrics(target, "tidal_mount_read_seconds_count", 1)
        assert min(reads.values()) >= 1
        assert _metrics(target, "tidal_mount_read_bytes_total", 3 << 20)


def test_second_mount_reads_from_the_cache_without_a_request(
    image: Path, registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    pulled = _push_pull(image, registry, "v1", tmp_path / "pulled")
    first, second = tmp_path / "m1", tmp_path / "m2"
    with mounted(pulled, first):
        assert (first / "big" / "b.bin").read_bytes() == FILES["/big/b.bin"]
    _drop_caches()
    # another pull of the same image into another directory: shares the node's cache
    pulled2 = _push_pull(image, registry, "v1", tmp_path / "pulled2")
    with mounted(pulled2, second):
        assert (second / "big" / "b.bin").read_bytes() == FILES["/big/b.bin"]
        doc = _stats(second)["lazy"]["total"]
    assert doc["requests"] == 0 and doc["bytes_fetched"] == 0, doc
    assert doc["hits"] > 0


def test_recorded_trace_is_pushed_and_prefetched_on_a_cold_mount(
    image: Path,
    registry: RegistryServer,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = tmp_path / "traced"
    subprocess.run(["cp", "-a", str(image), str(local)], check=True)
    res = record_trace(local, ["/bin/sh", "-c", "cat /big/c.bin > /dev/null; echo done"])
    assert res.ended_by == "exit" and res.exit_code == 0, res.output_tail
    assert "done" in res.output_tail
    assert res.trace.total_bytes >= len(FILES["/big/c.bin"])
    attach_trace(local, res.trace.serialize())
    assert [r.kind for r in Image.open(local).manifest.layers][-1] == LAYER_KIND_TRACE

    pulled = _push_pull(local, registry, "traced", tmp_path / "pulled")
    target = tmp_path / "mnt"
    with mounted(pulled, target) as info:
        deadline = time.monotonic() + 30
        while True:
            stats = _stats(target)
            doc = stats["lazy"]
            if (
                doc["prefetch"]["groups"]
                and not doc["prefetch"]["running"]
                and stats["warm"]["done"]
            ):
                break
            assert time.monotonic() < deadline, stats
        # the trace went into the disk's page cache, and the loop device reads through it:
        # the traced file is read with (almost) no FUSE read
        warm = stats["warm"]
        assert warm["pushed_runs"] == warm["runs"] > 0 and warm["errors"] == 0, warm
        assert warm["pushed_bytes"] >= len(FILES["/big/c.bin"])
        dev = loop.get(info.loop_device or "")
        assert dev is not None and not dev.direct_io
        shown = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", "image", "stats", str(target)],
            capture_output=True, text=True, timeout=120, check=True,
            env={**os.environ, "COLUMNS": "200"},
        ).stdout  # fmt: skip
        assert "trace pushed to the page cache" in shown
        assert f"{warm['runs']} of {warm['runs']} runs" in shown, shown
        requests = doc["total"]["requests"]
        fuse_bytes = stats["fuse"]["bytes_read"]
        assert (target / "big" / "c.bin").read_bytes() == FILES["/big/c.bin"]
        after = _stats(target)
        assert after["fuse"]["bytes_read"] - fuse_bytes < len(FILES["/big/c.bin"]) // 4
        # the file the trace read was prefetched: reading it needs no request
        assert after["lazy"]["total"]["requests"] == requests
        total = doc["total"]
        assert total["prefetched_bytes"] >= len(FILES["/big/c.bin"]) * 0.9, total
        assert doc["prefetch"]["errors"] == 0
        # with the page cache dropped it is read through FUSE, from the chunk cache: what is
        # fetched now is the FUSE file's read-ahead past the traced blocks, not the file
        fetched = after["lazy"]["total"]["bytes_fetched"]
        _drop_caches()
        assert (target / "big" / "c.bin").read_bytes() == FILES["/big/c.bin"]
        refetched = _stats(target)["lazy"]["total"]["bytes_fetched"] - fetched
        assert refetched < len(FILES["/big/c.bin"]) // 10, refetched
        requests = _stats(target)["lazy"]["total"]["requests"]
        # ...while a file the trace did not read still does
        assert (target / "big" / "d.bin").read_bytes() == FILES["/big/d.bin"]
        assert _stats(target)["lazy"]["total"]["requests"] > requests
    # the trace was kept with the pulled image: a warm mount does not ask the registry for it
    trace_rec = Image.open(pulled).manifest.layers[-1]
    assert (pulled / "blobs" / "sha256" / trace_rec.digest.split(":")[1]).is_file()

    # without the setting, no push, loop direct I/O as configured, the file costs FUSE reads
    monkeypatch.setenv("TIDAL_BLOCKDEV__WARM_PAGE_CACHE", "false")
    with mounted(pulled, target) as info:
        stats = _stats(target)
        assert stats["warm"] is None
        dev = loop.get(info.loop_device or "")
        assert dev is not None and dev.direct_io
        fuse_bytes = stats["fuse"]["bytes_read"]
        assert (target / "big" / "c.bin").read_bytes() == FILES["/big/c.bin"]
        assert _stats(target)["fuse"]["bytes_read"] - fuse_bytes >= len(FILES["/big/c.bin"])


def test_registry_gone_reads_fail_with_eio_and_a_log_line_and_the_server_lives(
    image: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDAL_BLOBS__RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("TIDAL_BLOBS__BACKOFF_INITIAL_S", "0.05")
    server = RegistryServer()
    server.start()
    try:
        pulled = _push_pull(image, server, "v1", tmp_path / "pulled")
    except BaseException:
        server.stop()
        raise
    target = tmp_path / "mnt"
    with mounted(pulled, target) as info:
        assert (target / "etc" / "hostname").read_text() == "tidal-demo\n"
        server.stop()
        with pytest.raises(OSError) as excinfo:
            (target / "big" / "d.bin").read_bytes()
        assert excinfo.value.errno == errno.EIO
        assert mounts.server_alive(info)
        log = info.log_file.read_text()
        assert "answering EIO" in log and "failed after 2 attempts" in log, log[-2000:]
        assert (target / "etc" / "hostname").read_text() == "tidal-demo\n"  # cached: fine


def test_a_dead_server_is_recovered_by_mounting_again(
    image: Path, registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    pulled = _push_pull(image, registry, "v1", tmp_path / "pulled")
    target = tmp_path / "mnt"
    info = mounts.mount_image(pulled, target)
    try:
        os.kill(info.server_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while mounts.server_alive(info):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OSError):
            (target / "big" / "a.bin").read_bytes()
        again = mounts.mount_image(pulled, target)  # what `tidal image mount` does when re-run
        assert again.server_pid != info.server_pid
        assert (target / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
    finally:
        mounts.unmount(target, force=True)


def test_local_store_push_pull_and_lazy_mount_without_a_registry(
    image: Path, tmp_path: Path
) -> None:
    store = LocalRegistry(tmp_path / "store")
    ref = ImageReference.parse("app:v1", default_registry="local")
    push_image(image, ref, store)
    pulled = tmp_path / "pulled"
    pull_image(ref, pulled, store)
    origin = json.loads((pulled / "origin.json").read_text())
    assert origin["registry"] == f"local:{tmp_path / 'store'}"
    with contextlib.closing(connect(origin["registry"])) as again:
        assert isinstance(again, LocalRegistry)
    target = tmp_path / "mnt"
    with mounted(pulled, target):
        assert (target / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        assert _stats(target)["lazy"]["source"].startswith("local store")


def test_cli_push_pull_mount_stats(
    image: Path, registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ}
    ref = f"{registry.address}/lazy/cli:v1"

    def tidal(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "tidal.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "pushed" in tidal("image", "push", str(image), ref)
    assert "metadata only" in tidal("image", "pull", ref, str(tmp_path / "p"))
    tidal("image", "mount", str(tmp_path / "p"), str(tmp_path / "mnt"))
    try:
        # figures exist from the moment the mount is ready, not a second later
        assert json.loads(tidal("image", "stats", "--json", str(tmp_path / "mnt")))["server_alive"]
        assert (tmp_path / "mnt" / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        _stats(tmp_path / "mnt")
        doc = json.loads(tidal("image", "stats", "--json", str(tmp_path / "mnt")))
        assert doc["lazy"]["total"]["bytes_fetched"] >= len(FILES["/big/a.bin"])
        assert "bytes fetched" in tidal("image", "stats", str(tmp_path / "mnt"))
    finally:
        tidal("image", "umount", "--force", str(tmp_path / "mnt"))
