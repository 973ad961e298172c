"""The pod namespace holder against the real kernel: a pod's IPC and UTS namespace files are
bind mounts in the holder's mount namespace, never in the host's table; the holder pins no host
filesystem; a later daemon finds it again; a killed one is replaced and the files made anew.

Each test runs its own holder (its own run directory), so the one the engine tests share is
never touched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal import proc
from tidal.engine.podns import (
    CLONE_NEWNET,
    HostPodNamespaces,
    NamespaceHolder,
    call_in_namespace,
    is_mounted,
    set_uts_hostname,
)
from tidal.errors import EngineError

pytestmark = pytest.mark.root


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[NamespaceHolder]:
    if os.geteuid() != 0:
        pytest.skip("the holder's mount namespace needs root")
    h = NamespaceHolder(tmp_path / "run")
    try:
        yield h
    finally:
        pid = h.running()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def _mounts(pid: int | str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each line of ``/proc/<pid>/mountinfo``."""
    out = []
    for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields, _, tail = ln.partition(" - ")
        out.append((fields.split()[4], tail.split()[0]))
    return out


def _hostname(uts: Path) -> str:
    return proc.run(
        ["nsenter", f"--uts={uts}", "hostname"], what="reading the hostname"
    ).stdout.strip()


def _wait_gone(pid: int) -> None:
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_files_are_mounted_in_the_holder_not_on_the_host(
    holder: NamespaceHolder, tmp_path: Path
) -> None:
    pns = HostPodNamespaces(holder)
    nsdir = tmp_path / "containers" / "c1" / "ns"
    paths = pns.create(nsdir, "pod-a")
    pid = holder.running()
    assert pid is not None and pns.exists(nsdir)
    assert str(paths.ipc).startswith(f"/proc/{pid}/root/pods/")
    # the holder: its tmpfs root, /usr, its own /proc and the pod's two files, nothing else
    inside = _mounts(pid)
    host = dict(_mounts("self"))
    assert {(m, t) for m, t in inside if not m.startswith("/pods/")} == {
        ("/", "tmpfs"),
        ("/usr", host.get("/usr") or host["/"]),  # a bind of the host's /usr, read-only
        ("/proc", "proc"),
    }, inside
    assert [t for m, t in inside if m.startswith("/pods/")] == ["nsfs", "nsfs"]
    assert len(inside) == 5, inside
    assert not [m for m, t in _mounts("self") if t == "nsfs" and "/pods/" in m]
    # the namespaces are real and named; a reused sandbox renames and renews them
    assert _hostname(paths.uts) == "pod-a"
    here = socket.gethostname()
    pns.set_hostname(nsdir, "pod-b")  # from a thread that joins the pod's UTS namespace
    assert _hostname(paths.uts) == "pod-b" and socket.gethostname() == here
    with pytest.raises(EngineError, match=r"UTS namespace .*missing: No such file"):
        set_uts_hostname(tmp_path / "missing", "x")
    ipc_before = paths.ipc.stat().st_ino
    pns.renew_ipc(nsdir)
    assert paths.ipc.stat().st_ino != ipc_before
    assert holder.pods() == {paths.ipc.parent.name: nsdir}  # the leak checks' view
    pns.destroy(nsdir)
    assert not pns.exists(nsdir) and not nsdir.exists() and holder.pods() == {}
    assert len(_mounts(pid)) == 3


def test_a_sandbox_netns_is_made_in_the_same_step(holder: NamespaceHolder, tmp_path: Path) -> None:
    """``netns=``: the pod's network namespace is bound in the holder by the same process as
    its IPC and UTS ones (one process fewer per sandbox), a namespace of its own."""
    pns = HostPodNamespaces(holder)
    nsdir = tmp_path / "c3" / "ns"
    paths = pns.create(nsdir, "pod-n", netns="/netns/tidal-test")
    pid = holder.running()
    assert pid is not None
    net = holder.outer(pid, "/netns/tidal-test")
    assert [t for m, t in _mounts(pid) if m == "/netns/tidal-test"] == ["nsfs"]
    assert net.stat().st_ino != os.stat("/proc/self/ns/net").st_ino
    assert net.stat().st_ino != paths.ipc.stat().st_ino != paths.uts.stat().st_ino
    links = proc.run(
        ["nsenter", f"--net={net}", "ip", "-o", "link"], what="listing the new netns's links"
    ).stdout
    assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"], links
    # a process started from a thread that joined it is born there; this thread stays home
    inside = call_in_namespace(
        net,
        CLONE_NEWNET,
        lambda: proc.run(["readlink", "/proc/self/ns/net"], what="netns of a child").stdout,
        "test",
    )
    assert inside.strip() == f"net:[{net.stat().st_ino}]"
    assert os.stat("/proc/thread-self/ns/net").st_ino != net.stat().st_ino
    with pytest.raises(ZeroDivisionError):
        call_in_namespace(net, CLONE_NEWNET, lambda: 1 // 0, "test")
    with pytest.raises(EngineError, match=r"test: joining .*missing"):
        call_in_namespace(tmp_path / "missing", CLONE_NEWNET, lambda: None, "test")
    pns.destroy(nsdir)
    holder.unbind(pid, "/netns/tidal-test")  # the network's destroy_netns does this
    assert len(_mounts(pid)) == 3


def test_a_later_daemon_finds_the_holder_and_a_killed_one_is_replaced(
    holder: NamespaceHolder, tmp_path: Path
) -> None:
    pns = HostPodNamespaces(holder)
    nsdir = tmp_path / "c2" / "ns"
    pns.create(nsdir, "pod-c")
    pid = holder.running()
    assert pid is not None
    later = NamespaceHolder(holder.run_dir)  # another daemon, same host
    assert later.running() == pid and HostPodNamespaces(later).exists(nsdir)
    # a pid file naming a live process that is not the holder (no marker in its root)
    stale = NamespaceHolder(tmp_path / "stale")
    stale.run_dir.mkdir()
    stale.pid_file.write_text(f"{os.getpid()}\n")
    assert stale.running() is None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    assert not pns.exists(nsdir)  # the files went with the holder
    pns.destroy(nsdir)  # nothing there is no error
    paths = pns.create(nsdir, "pod-c")  # as a sandbox's start does after a reboot
    new = holder.running()
    assert new is not None and new != pid and pns.exists(nsdir)
    assert _hostname(paths.uts) == "pod-c"
    pns.destroy(nsdir)


def test_a_holder_that_cannot_start_is_one_clear_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    run = tmp_path / "run"
    run.mkdir()
    (run / "podns-root").write_text("not a directory\n")  # where its tmpfs would go
    with pytest.raises(EngineError, match="pod namespace holder"):
        NamespaceHolder(run).pid()


def test_namespaces_are_made_and_unmounted_by_a_thread_not_a_process(
    holder: NamespaceHolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's namespaces are made, named, renewed and unmounted from a short-lived thread in
    the holder's mount namespace: no process is started (it was ``nsenter`` + ``unshare`` +
    ``hostname`` per create and an ``nsenter`` + ``umount`` per file at removal), and the
    calling thread's own namespaces, root and working directory stay as they were."""
    pns = HostPodNamespaces(holder)
    pid = holder.pid()  # the holder itself is a process, started before counting
    started: list[object] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> object:
        started.append(args[0] if args else kwargs.get("args"))
        return real_popen(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", popen)
    mine = {k: os.readlink(f"/proc/thread-self/ns/{k}") for k in ("mnt", "net", "ipc", "uts")}
    cwd, root = os.getcwd(), os.stat("/proc/thread-self/root").st_ino
    nsdir = tmp_path / "c4" / "ns"
    paths = pns.create(nsdir, "pod-t", netns="/netns/tidal-thread")
    net = holder.outer(pid, "/netns/tidal-thread")
    made = {f.stat().st_ino for f in (paths.ipc, paths.uts, net)}
    assert len(made) == 3 and not made & {os.stat(f"/proc/self/ns/{k}").st_ino for k in mine}
    pns.renew_ipc(nsdir)
    pns.destroy(nsdir)
    holder.unbind(pid, "/netns/tidal-thread")
    assert started == []
    assert len(_mounts(pid)) == 3 and not is_mounted(net)
    assert {k: os.readlink(f"/proc/thread-self/ns/{k}") for k in mine} == mine
    assert (os.getcwd(), os.stat("/proc/thread-self/root").st_ino) == (cwd, root)
    monkeypatch.undo()
    # a failure names the step and leaves nothing mounted
    with pytest.raises(EngineError, match=r"^making it: .*Invalid argument"):
        holder.unshare(pid, {"uts": "/pods/bad/uts"}, "x" * 100, what="making it")
    assert len(_mounts(pid)) == 3


def test_a_holder_is_found_only_once_it_has_let_go_of_the_host(tmp_path: Path) -> None:
    """``running()`` answers once the holder's setup is done: a first caller must never see
    the host's mounts still attached under its old root (seen in CI when the marker that
    ``running()`` checks was made before ``pivot_root``)."""
    if os.geteuid() != 0:
        pytest.skip("the holder's mount namespace needs root")
    for i in range(10):
        h = NamespaceHolder(tmp_path / f"run{i}")
        pid = h.pid()
        try:
            mounts = _mounts(pid)
            assert not [m for m, _ in mounts if m == "/old" or m.startswith("/old/")], mounts
            assert len(mounts) == 3, mounts
        finally:
            os.kill(pid, signal.SIGKILL)
