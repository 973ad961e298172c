"""Fixtures for real-container tests: rootfs trees, an Engine on a tmp state dir, full cleanup.

Every engine fixture removes its containers in ``finally`` and then checks that nothing it
made is left: no mount and no loop device under its state directory, no cgroup under its
cgroup parent, no network namespace, no bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidal.engine.client import EngineClient
from tidal.engine.containers import Engine
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.errors import TidalError
from tidal.testing import trees

CACHE = Path("/var/cache/tidal-test")
BUSYBOX_DIR = CACHE / "busybox"
DEBIAN_DIR = CACHE / "debian-bookworm"


def make_busybox_rootfs(dest: Path) -> Path:
    """A minimal rootfs: static busybox plus its applet links (tidal.testing.trees')."""
    try:
        return trees.make_busybox_rootfs(dest)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def busybox_rootfs() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building a rootfs needs root")
    CACHE.mkdir(parents=True, exist_ok=True)
    return make_busybox_rootfs(BUSYBOX_DIR)


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """``debootstrap --variant=minbase --include=procps bookworm``, built once and cached."""
    if (DEBIAN_DIR / "usr" / "bin" / "free").exists():
        return DEBIAN_DIR
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("needs root and debootstrap to build a Debian rootfs")
    tmp = CACHE / "debian.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=procps", "bookworm", str(tmp)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap failed (no mirror reachable?): {proc.stderr.strip()[-300:]}")
    os.rename(tmp, DEBIAN_DIR)
    return DEBIAN_DIR


def _cached_image(src: Path, name: str) -> Path:
    """``tidal image build SRC`` once per source tree, cached next to the trees."""
    out = CACHE / "images" / name
    if (out / "manifest.json").exists():
        return out
    tmp = CACHE / "images" / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tidal = shutil.which("tidal") or str(Path(sys.executable).with_name("tidal"))
    proc = subprocess.run(
        [tidal, "image", "build", str(src), "-o", str(tmp)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssertionError(f"tidal image build {src} failed: {proc.stderr.strip()[-500:]}")
    os.rename(tmp, out)
    return out


@pytest.fixture(scope="session")
def busybox_image(busybox_rootfs: Path) -> Path:
    """A Tidal block image of the busybox tree."""
    return _cached_image(busybox_rootfs, "busybox")


@pytest.fixture(scope="session")
def debian_image(debian_rootfs: Path) -> Path:
    """A Tidal block image of the Debian minbase tree."""
    return _cached_image(debian_rootfs, "debian-bookworm")


def _mounts_under(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4]
            if mp.startswith(str(path)):
                out.append(mp)
    return out


def _loops_under(path: Path) -> list[str]:
    proc = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    return [ln for ln in proc.stdout.splitlines() if str(path) in ln]


def _cgroups_under(parent: str) -> list[str]:
    found = []
    for ctrl in ("memory", "cpu", "pids", "unified"):
        d = Path("/sys/fs/cgroup") / ctrl / parent
        if d.is_dir():
            found += [str(p) for p in d.iterdir() if p.is_dir()]
    return found


def _netns_with(prefix: str) -> list[str]:
    """Network namespaces named ``prefix...``: ``ip netns``'s and the holder's."""
    from tidal.engine.podns import NamespaceHolder

    d = Path("/var/run/netns")
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    return sorted(n for n in names | NamespaceHolder().netns_names() if n.startswith(prefix))


@pytest.fixture
def engine_settings(tmp_path: Path) -> EngineSettings:
    tag = uuid.uuid4().hex[:6]
    return EngineSettings(
        state_dir=tmp_path / "engine",
        default_disk_quota_bytes=64 * 1024 * 1024,
        cgroup_parent=f"tidal-test-{tag}",
        bridge=f"tdt{tag}",
        subnet=f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}.0/24",
        stop_timeout_s=2.0,
        lxcfs="off",
        upgrade_probe_s=0.5,
    )


@pytest.fixture
def engine(engine_settings: EngineSettings) -> Iterator[Engine]:
    eng = Engine(engine_settings)
    try:
        yield eng
    finally:
        cleanup_engine(eng)


@pytest.fixture
def daemon(
    engine_settings: EngineSettings, engine_cleanup: Callable[[Engine], None]
) -> Iterator[tuple[Daemon, EngineClient]]:
    d = Daemon(engine_settings)
    d.start()
    client = EngineClient(engine_settings.resolved_socket_path())
    try:
        yield d, client
    finally:
        client.close()
        eng = Engine(engine_settings)
        d.close()
        engine_cleanup(eng)


@pytest.fixture
def engine_cleanup() -> Callable[[Engine], None]:
    """The leak-checking cleanup, for tests that run their own daemon or engine."""
    return cleanup_engine


def cleanup_engine(eng: Engine) -> None:
    """Remove every container, stop lxcfs, drop the bridge; then assert nothing leaked."""
    from tidal.engine.network import netns_name, remove_bridge

    leftovers_errors = []
    try:
        recs = eng.store.list()
    except Exception:  # store already closed by the test
        recs = []
    for rec in recs:
        try:
            eng.remove(rec.id, force=True)
        except TidalError as exc:
            leftovers_errors.append(str(exc))
    with contextlib.suppress(TidalError):
        eng.lxcfs.stop()
        # hot image mounts no container uses are the engine's cache, which its close releases
        eng.storage.trim_hot_images(keep=0)
    remove_bridge(eng.settings.bridge)
    state = eng.state_dir
    # the state directory's own mount is the engine's anchor (tidal.engine.mountview): its
    # close releases it once nothing is mounted below, checked after the close
    mounts = [mp for mp in _mounts_under(state) if mp != str(state)]
    loops = _loops_under(state)
    deadline = time.monotonic() + 5
    while loops and not mounts and time.monotonic() < deadline:
        # a busy quota volume is unmounted lazily; its autoclear loop device detaches when the
        # last user lets go, a moment later: wait for that rather than report a leak
        time.sleep(0.1)
        loops = _loops_under(state)
    cgroups = _cgroups_under(eng.settings.cgroup_parent)
    netns = [n for r in recs for n in _netns_with(netns_name(r.id))]
    for mp in reversed(mounts):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    for ctrl in (
        "memory",
        "cpu",
        "cpuacct",
        "pids",
        "cpuset",
        "devices",
        "freezer",
        "blkio",
        "hugetlb",
        "systemd",
        "unified",  # runc also places containers in the v2 hierarchy of a hybrid host
    ):
        d = Path("/sys/fs/cgroup") / ctrl / eng.settings.cgroup_parent
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(Exception):
        eng.close()
    assert not leftovers_errors, leftovers_errors
    assert not mounts, f"mounts left behind: {mounts}"
    assert str(state) not in _mounts_under(state), "the engine's anchor outlived its close"
    assert not loops, f"loop devices left behind: {loops}"
    assert not cgroups, f"cgroups left behind: {cgroups}"
    assert not netns, f"network namespaces left behind: {netns}"
