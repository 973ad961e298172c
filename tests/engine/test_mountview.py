"""The runtime's create sees the host's mounts and its container's, not every container's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tidal.engine.containers import Engine
from tidal.engine.mounter import anchor_status
from tidal.engine.mountview import kept_dirs, trimmed_view
from tidal.engine.spec import ContainerSpec, HookSpec

STATE = "/var/lib/tidal/engine"


def test_kept_dirs_are_one_container_each_and_the_state_directorys_parts() -> None:
    config = {
        "root": {"path": f"{STATE}/containers/aaa/rootfs"},
        "mounts": [
            {"source": f"{STATE}/containers/aaa/volumes/0", "destination": "/data"},
            {"source": f"{STATE}/lxcfs/mnt/proc/meminfo", "destination": "/proc/meminfo"},
            {"source": "/etc/hosts", "destination": "/etc/hosts"},
        ],
        "linux": {"namespaces": [{"type": "ipc", "path": f"{STATE}/containers/sbx/ns/ipc"}]},
        "hooks": {"prestart": [{"path": "/bin/sh", "args": ["sh", f"{STATE}/containers/"]}]},
        "annotations": {"x": f"{STATE}/../escape", "y": f"{STATE}/containers/../up"},
    }
    assert kept_dirs(config, STATE, ("containers",)) == [
        f"{STATE}/containers/aaa",
        f"{STATE}/containers/sbx",
        f"{STATE}/lxcfs",
    ]
    # without the per-entry rule the whole directory of containers would be kept
    assert f"{STATE}/containers" in kept_dirs(config, STATE)


def _line(mid: int, parent: int, dev: str, root: str, mp: str, fs: str = "ext4") -> str:
    return f"{mid} {parent} {dev} {root} {mp} rw,relatime shared:1 - {fs} /dev/x rw"


def test_anchor_status_tells_a_self_bind_from_a_file_system_mounted_there() -> None:
    host = [_line(20, 1, "8:1", "/", "/"), _line(21, 20, "0:5", "/", "/proc", "proc")]
    free = "\n".join(host)
    assert anchor_status(free, STATE) == "free"
    anchored = "\n".join([*host, _line(30, 20, "8:1", STATE, STATE)])
    assert anchor_status(anchored, STATE) == "anchored"
    busy = "\n".join([*host, _line(31, 20, "0:40", "/", f"{STATE}/containers/a/rootfs", "ovl")])
    assert anchor_status(busy, STATE) == "busy"
    inside = anchored + "\n" + _line(32, 30, "0:40", "/", f"{STATE}/containers/a/rootfs", "ovl")
    assert anchor_status(inside, STATE) == "anchored"
    # /var on a file system of its own: the bind's root is relative to that one
    var = [*host, _line(40, 20, "8:2", "/", "/var")]
    assert (
        anchor_status("\n".join([*var, _line(41, 40, "8:2", "/lib/tidal/engine", STATE)]), STATE)
        == "anchored"
    )
    # a file system of its own at the state directory is not an anchor; a bind over it is
    own = [*host, _line(50, 20, "8:3", "/", STATE)]
    assert anchor_status("\n".join(own), STATE) == "free"
    assert anchor_status("\n".join([*own, _line(51, 50, "8:3", "/", STATE)]), STATE) == "anchored"
    # a bind of some other directory there is no anchor either
    other = [*host, _line(60, 20, "8:1", "/srv", STATE)]
    assert anchor_status("\n".join(other), STATE) == "free"


def _mountpoints(text: str) -> set[str]:
    return {ln.split()[4] for ln in text.splitlines()}


@pytest.mark.root
def test_trimmed_view_drops_the_anchors_other_mounts_and_comes_back(tmp_path: Path) -> None:
    anchor = tmp_path / "state"
    mine, other = anchor / "containers" / "mine", anchor / "containers" / "other"
    for d in (mine / "rootfs", other / "rootfs", anchor / "lxcfs"):
        d.mkdir(parents=True)
    mounts = [anchor, mine / "rootfs", other / "rootfs"]
    subprocess.run(["mount", "--bind", str(anchor), str(anchor)], check=True)
    try:
        for d in mounts[1:]:
            subprocess.run(["mount", "-t", "tmpfs", "tidal-test", str(d)], check=True)
        (mine / "rootfs" / "mark").write_text("mine")
        (anchor / "lxcfs" / "plain").write_text("a file, no mount")
        before = Path("/proc/self/mountinfo").read_text()
        with trimmed_view(str(anchor), [str(mine)]) as why:
            assert why is None
            inside = Path("/proc/self/mountinfo").read_text()
            seen = (mine / "rootfs" / "mark").read_text()
            plain = (anchor / "lxcfs" / "plain").read_text()
            # what a child (the runtime) sees is this view
            child = subprocess.run(["cat", "/proc/self/mountinfo"], capture_output=True, text=True)
        after = Path("/proc/self/mountinfo").read_text()
        assert seen == "mine" and plain == "a file, no mount"
        for view in (inside, child.stdout):
            assert str(mine / "rootfs") in _mountpoints(view)
            assert str(other / "rootfs") not in _mountpoints(view)
        assert _mountpoints(after) == _mountpoints(before)  # the host's namespace again
        assert str(other / "rootfs") in _mountpoints(after)
        # a path that cannot be kept: the host's view, and why
        with trimmed_view(str(anchor), [str(anchor / "containers" / "gone")]) as why:
            assert why is not None and "gone" in why
            assert _mountpoints(Path("/proc/self/mountinfo").read_text()) == _mountpoints(before)
    finally:
        for d in reversed(mounts):
            subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.loop
def test_runc_creates_beside_its_own_mounts_only(
    engine: Engine, busybox_rootfs: Path, tmp_path: Path
) -> None:
    assert engine.anchored, "the engine did not anchor its state directory"
    first = engine.run(ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300")))
    view = tmp_path / "view.txt"
    hook = HookSpec("/bin/sh", ("sh", "-c", f"cat /proc/self/mountinfo > {view}"))
    second = engine.run(
        ContainerSpec(image=str(busybox_rootfs), command=("sleep", "300"), prestart_hooks=(hook,))
    )
    host = _mountpoints(Path("/proc/self/mountinfo").read_text())
    runtime = _mountpoints(view.read_text())  # a prestart hook runs in the runtime's namespace
    own = {p for p in host if p.startswith(str(engine.cdir(second.id)) + "/")}
    others = {p for p in host if p.startswith(str(engine.cdir(first.id)) + "/")}
    assert own and others, (own, others)
    assert own <= runtime
    assert not others & runtime, others & runtime
    # the container itself still works on its own root and writes reach the host's mount
    engine.exec(second.id, ["sh", "-c", "echo hi > /written"])
    written = engine.cdir(second.id) / "rootfs" / "written"
    assert written.read_text() == "hi\n"
    assert json.loads((engine.cdir(second.id) / "bundle" / "config.json").read_text())


@pytest.mark.root
def test_a_view_failing_halfway_leaves_the_host_namespace_whole(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    before = Path("/proc/self/mountinfo").read_text()
    # the clone of x succeeds, the detach does not (tmp_path is no mount): nothing half-done
    with trimmed_view(str(tmp_path), [str(tmp_path / "x")]) as why:
        assert why is not None and "detaching" in why
        assert Path("/proc/self/mountinfo").read_text() == before
    assert Path("/proc/self/mountinfo").read_text() == before


@pytest.mark.root
def test_host_mounter_anchors_only_a_directory_with_nothing_mounted_below(tmp_path: Path) -> None:
    from tidal.engine.mounter import HostMounter

    m = HostMounter()
    state, busy = tmp_path / "state", tmp_path / "busy"
    (state / "containers" / "a").mkdir(parents=True)
    (busy / "containers" / "a").mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "tidal-test", str(busy / "containers" / "a")], check=True
    )
    try:
        assert m.anchor(state) and str(state) in _mountpoints(
            Path("/proc/self/mountinfo").read_text()
        )
        assert m.anchor(state)  # once: a second call finds it
        assert sum(p == str(state) for p in _table_mountpoints()) == 1
        # below an anchor, mounts keep it; with nothing below, it goes (even while a file is open)
        sub = state / "containers" / "a"
        subprocess.run(["mount", "-t", "tmpfs", "tidal-test", str(sub)], check=True)
        m.release_anchor(state)
        assert str(state) in _table_mountpoints()
        subprocess.run(["umount", str(sub)], check=True)
        with open(state / "open-file", "w"):
            m.release_anchor(state)
        assert str(state) not in _table_mountpoints()
        # mounts made before any anchor: no anchor (it would hide them from their own paths)
        assert not m.anchor(busy)
        assert str(busy) not in _table_mountpoints()
    finally:
        subprocess.run(["umount", "-l", str(busy / "containers" / "a")], check=False)
        subprocess.run(["umount", "-l", str(state)], check=False)


def _table_mountpoints() -> list[str]:
    return [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]


@pytest.mark.root
def test_an_anchor_below_a_shared_mount_does_not_double_the_mounts_below_it(
    tmp_path: Path,
) -> None:
    from tidal.engine.mounter import HostMounter

    host, state = tmp_path / "host", tmp_path / "host" / "state"
    (state / "containers" / "a").mkdir(parents=True)
    sub = state / "containers" / "a"
    # a shared parent, as a systemd host's root is
    subprocess.run(["mount", "--bind", str(host), str(host)], check=True)
    subprocess.run(["mount", "--make-shared", str(host)], check=True)
    m = HostMounter()
    try:
        assert m.anchor(state)
        subprocess.run(["mount", "-t", "tmpfs", "tidal-test", str(sub)], check=True)
        assert _table_mountpoints().count(str(sub)) == 1, _table_mountpoints()
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=False)
        m.release_anchor(state)
        subprocess.run(["umount", "-l", str(host)], check=False)
    assert not [p for p in _table_mountpoints() if p.startswith(str(host))]
