"""A pod's IPC and UTS namespaces as files, made before any of its containers starts.

Under runc and crun the containers of a pod share the network, IPC and UTS namespaces of its
sandbox container. They used to join IPC and UTS through ``/proc/<sandbox pid>/ns/...``, so no
member could start before the sandbox ran: an instance cost two container starts in a row.
Bind-mounted on files (as ``ip netns`` keeps the network namespace), the namespaces exist
from the sandbox's create on, and every container of the pod, the sandbox included, joins
them by path: all of them start at once. The files are keyed by the sandbox container's
directory (``<container dir>/ns``) and live from its create to its ``rm``, like its netns;
the pod's hostname is set in the UTS namespace once, when it is made (the bundles of
containers that join it carry none).

Runtimes whose pods share one sandbox kernel (runsc: ``RuntimeCapabilities.pod_sandbox``)
need none of this; their members are put into the sandbox by annotations.

One adapter, :class:`PodNamespaces`: :class:`HostPodNamespaces` makes, binds and unmounts
them from a short-lived thread of the daemon in the holder's mount namespace (below);
:class:`tidal.testing.engine.FakePodNamespaces` keeps plain files.

**Where the files are mounted.** Not in the host's mount table: every mount there is read,
in full, by each ``runc create`` (and its ``runc init``, and ``mkfs``) through
``/proc/self/mountinfo``, so two nsfs mounts per pod made every container start slower as the
node filled (bare ``runc`` create+start: 2,881 a minute beside 21 mounts, 1,113 beside
2,500). They are mounted instead in the mount namespace of one small process per host, the
*holder* (:class:`NamespaceHolder`: ``sleep infinity`` on a private tmpfs root holding only
``/usr`` read-only and ``/proc``, so it pins no host filesystem), at
``/pods/<key>/{ipc,uts}`` (and the containers' network namespaces at ``/netns``:
:mod:`tidal.engine.network`). The runtime opens them through the holder's root,
``/proc/<holder pid>/root/pods/<key>/ipc``, which the kernel resolves in the holder's
namespace. The key is a hash of the sandbox's directory; ``/pods/<key>/owner`` names that
directory (for leak checks). The holder outlives daemons (own session, pid in
``/run/tidal/podns.pid``); if it is killed, the namespaces lose their files but not their
members, and a sandbox's next start makes new ones (as after a host reboot). Files made by
an older Tidal in the sandbox's directory are still found, joined and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tidal import proc
from tidal.engine import mountview
from tidal.errors import EngineError

log = logging.getLogger(__name__)

POD_NS_DIR = "ns"
"""Below a sandbox container's directory: where its pod's namespace files were (Tidal before
the holder) and what keys them in the holder."""
UMOUNT_TRIES = 4
HOLDER_RUN_DIR = Path("/run/tidal")
"""The holder's pid file, lock and (empty, on the host) tmpfs staging directory: on /run, so
a reboot, which kills the holder, also forgets it."""
HOLDER_MARKER = ".tidal-podns"
HOLDER_START_S = 10.0
HOLDER_SCRIPT = r"""
root="$1"; pidfile="$2"
exec </dev/null >/dev/null 2>"$pidfile.err"
set -e
mount -t tmpfs -o mode=0700,size=16m tidal-podns "$root"
mkdir "$root/usr" "$root/proc" "$root/pods" "$root/netns" "$root/old"
for l in bin sbin lib lib32 lib64; do if [ -e "/$l" ]; then ln -s "usr/$l" "$root/$l"; fi; done
mount --bind /usr "$root/usr"
mount -o remount,bind,ro "$root/usr"
mount -t proc proc "$root/proc"
echo $$ > "$pidfile.tmp"
mv "$pidfile.tmp" "$pidfile"
cd "$root"
pivot_root . old
umount -l /old
rmdir /old
: > /.tidal-podns
exec sleep infinity 2>&1
"""
"""Run by ``setsid --fork unshare --mount --propagation private sh -c``: a tmpfs root with
nothing of the host's mounts but ``/usr`` (read-only, for its ``sleep``) and a proc of its
own (``/proc/thread-self`` for the binds made in it), then ``sleep`` for ever. Its
pid file is written before ``pivot_root`` (the host's ``/run`` is gone after it), the marker
that says it is the holder and ready (:func:`_pid_alive`) last, once the host's mounts are
detached: a caller never sees it with the old root still attached; its
standard streams are ``/dev/null`` (``setsid --fork`` returns at once, and a pipe held open
would keep :func:`tidal.proc.run` waiting), errors go to ``podns.pid.err``."""


@dataclass(frozen=True)
class PodNamespacePaths:
    """The files a pod's containers join (OCI ``linux.namespaces[].path``)."""

    ipc: Path
    uts: Path

    @classmethod
    def under(cls, directory: Path) -> PodNamespacePaths:
        return cls(directory / "ipc", directory / "uts")

    def files(self) -> tuple[Path, Path]:
        return (self.ipc, self.uts)


class PodNamespaces(ABC):
    """Makes and removes a pod's persistent IPC and UTS namespaces, keyed by a directory."""

    def paths(self, directory: Path) -> PodNamespacePaths:
        """The files a runtime opens to join the pod of ``directory``."""
        return PodNamespacePaths.under(directory)

    @abstractmethod
    def create(
        self, directory: Path, hostname: str, *, netns: str | None = None
    ) -> PodNamespacePaths:
        """Make both namespaces, the UTS one with ``hostname``; on failure nothing is left.
        ``netns``: also make the pod's network namespace, bound on that path inside the
        namespace holder (:meth:`Network.holder_netns
        <tidal.engine.network.Network.holder_netns>`), in the same step; the network's
        ``destroy_netns`` removes it."""

    @abstractmethod
    def exists(self, directory: Path) -> bool:
        """Whether both namespaces are there to join (after a host reboot they are not)."""

    @abstractmethod
    def destroy(self, directory: Path) -> None:
        """Unmount and remove the files and the directory; nothing there is no error."""

    @abstractmethod
    def set_hostname(self, directory: Path, hostname: str) -> None:
        """Rename the pod's UTS namespace (a warm sandbox handed to an instance, or back)."""

    @abstractmethod
    def renew_ipc(self, directory: Path) -> None:
        """Replace the IPC namespace by a fresh one, so a reused sandbox's next pod sees none
        of the last one's SysV objects or POSIX message queues (members join the file; a
        pause process, where the sandbox runs one, keeps the old one and never uses it)."""


def is_mounted(path: Path) -> bool:
    """A namespace bind mount is on another device (nsfs) than the directory holding it."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except (FileNotFoundError, NotADirectoryError):
        return False


def unbind(path: Path, umount: Callable[[], object]) -> None:
    """Unmount the namespace bind mount on ``path`` by ``umount()`` until none is left (a
    retried create may have bound it twice over), at most :data:`UMOUNT_TRIES` times."""
    for _ in range(UMOUNT_TRIES):
        if not is_mounted(path):
            return
        umount()


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}/root/{HOLDER_MARKER}").exists()


class NamespaceHolder:
    """The host's one holder process (see the module docstring): started on first use, found
    again by its pid file by later daemons, checked by the marker file in its root (a
    recycled pid has none)."""

    def __init__(self, run_dir: Path = HOLDER_RUN_DIR) -> None:
        self.run_dir = run_dir
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "podns.pid"

    def running(self) -> int | None:
        """The holder's pid if it runs, without starting one."""
        pid = self._pid
        if pid is not None and _pid_alive(pid):
            return pid
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        self._pid = pid
        return pid

    def pid(self) -> int:
        """The holder's pid, started if none runs (under a host-wide lock)."""
        pid = self.running()
        if pid is not None:
            return pid
        with self._lock:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "podns.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                pid = self.running()
                if pid is None:
                    pid = self._start()
                self._pid = pid
                return pid

    def _start(self) -> int:
        root = self.run_dir / "podns-root"
        try:
            root.mkdir(exist_ok=True)
            self.pid_file.unlink(missing_ok=True)
        except OSError as exc:
            raise EngineError(
                f"starting the pod namespace holder: cannot use {root}: {exc.strerror or exc}"
            ) from exc
        proc.run(
            ["setsid", "--fork", "unshare", "--mount", "--propagation", "private",
             "sh", "-c", HOLDER_SCRIPT, "sh", root, self.pid_file],
            what="starting the pod namespace holder",
            error=EngineError,
            timeout_s=30,
            install_hint="apt-get install util-linux",
        )  # fmt: skip
        deadline = time.monotonic() + HOLDER_START_S
        while time.monotonic() < deadline:
            pid = self.running()
            if pid is not None:
                log.info("pod namespace holder started: pid %d", pid)
                return pid
            time.sleep(0.01)
        try:
            why = Path(f"{self.pid_file}.err").read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            why = f"no live pid in {self.pid_file}"
        raise EngineError(
            f"the pod namespace holder did not start within {HOLDER_START_S:.0f} s: {why}"
        )

    def root(self, pid: int) -> Path:
        return Path(f"/proc/{pid}/root")

    def pods(self) -> dict[str, Path]:
        """Every pod the holder keeps files for: its key and the directory it belongs to."""
        pid = self.running()
        if pid is None:
            return {}
        out: dict[str, Path] = {}
        with contextlib.suppress(FileNotFoundError):
            for d in (self.root(pid) / "pods").iterdir():
                with contextlib.suppress(OSError):
                    out[d.name] = Path((d / "owner").read_text().strip())
        return out

    def netns_names(self) -> set[str]:
        """The network namespaces the holder keeps (:mod:`tidal.engine.network`)."""
        pid = self.running()
        if pid is None:
            return set()
        try:
            return {p.name for p in (self.root(pid) / "netns").iterdir() if is_mounted(p)}
        except FileNotFoundError:
            return set()

    def outer(self, pid: int, inner: str) -> Path:
        """The host's path to ``inner`` (absolute in the holder's namespace)."""
        return self.root(pid) / inner.lstrip("/")

    def in_mount_namespace(self, pid: int, fn: Callable[[], _T], what: str) -> _T:
        """``fn()`` in a thread that joins the holder's mount namespace (paths in it are
        absolute there) and ends: no ``nsenter`` process per namespace made or removed."""
        return call_in_namespace(f"/proc/{pid}/ns/mnt", mountview.CLONE_NEWNS, fn, what)

    def unshare(self, pid: int, files: dict[str, str], hostname: str | None, *, what: str) -> None:
        """New namespaces of the kinds in ``files`` (``{"net": "/netns/x", ...}``, paths in the
        holder's namespace, made if missing), each bound on its file, the UTS one named
        ``hostname``: what ``nsenter -t HOLDER -m unshare --net=F ... hostname NAME`` did
        (three processes, ~10 ms of CPU) from one short-lived thread of this process, which
        makes the namespaces its own, binds them and ends (they live on in their files)."""
        for inner in files.values():
            f = self.outer(pid, inner)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()  # a bind mount goes onto an existing file
        flags = 0
        for kind in files:
            flags |= _NS_FLAGS[kind]

        def make() -> None:
            mountview.sys_unshare(flags)
            if hostname is not None:
                socket.sethostname(hostname)
            for kind, inner in files.items():
                mountview.sys_mount(f"/proc/thread-self/ns/{kind}", inner, "", mountview.MS_BIND)

        try:
            self.in_mount_namespace(pid, make, what)
        except OSError as exc:
            raise EngineError(f"{what}: {exc.strerror or exc}") from None

    def unbind(self, pid: int, inner: str) -> Path:
        """:func:`unbind` of ``inner`` in the holder's namespace (umount2(2) from a thread in
        it); returns its host path."""
        f = self.outer(pid, inner)
        what = f"unmounting the pod namespace {inner} in the holder's mount namespace"

        def umount() -> None:
            try:
                self.in_mount_namespace(pid, lambda: mountview.sys_umount(inner), what)
            except OSError as exc:
                raise EngineError(f"{what}: {exc.strerror or exc}") from None

        unbind(f, umount)
        return f


def _unbind_host(f: Path) -> None:
    """:func:`unbind` of a file an older Tidal bound in the host's own mount namespace."""

    def umount() -> None:
        try:
            mountview.sys_umount(f)
        except OSError as exc:
            raise EngineError(f"unmounting the pod namespace {f}: {exc.strerror}") from None

    unbind(f, umount)


def pod_key(directory: Path) -> str:
    return hashlib.sha256(str(directory).encode()).hexdigest()[:32]


CLONE_FS = 0x00000200
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
_NS_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET}
_T = TypeVar("_T")


def call_in_namespace(path: str | Path, nstype: int, fn: Callable[[], _T], what: str) -> _T:
    """``fn()`` in a thread of this process that joins the namespace at ``path`` and then
    ends: UTS, network and (with its own root and cwd) mount namespaces are per thread (and
    a child a thread starts is born in that thread's), so nothing else of the daemon moves,
    and no ``nsenter`` is started. Its exception is raised here; failing to join is an
    :class:`EngineError` naming ``what``."""
    result: list[_T] = []
    failed: list[BaseException] = []

    def joined() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # a mount namespace is joined only by a task whose root and cwd are its own
                # (threads share them): this thread leaves the others' first
                if nstype == mountview.CLONE_NEWNS:
                    mountview.sys_unshare(CLONE_FS)
                mountview.sys_setns(fd, nstype)
            finally:
                os.close(fd)
        except OSError as exc:
            failed.append(EngineError(f"{what}: joining {path}: {exc.strerror or exc}"))
            return
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=joined, name="in-namespace")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return result[0]


def set_uts_hostname(uts: Path, hostname: str) -> None:
    """Set the hostname of the UTS namespace at ``uts`` (a warm sandbox's hand-out, on the
    create's path, starts no ``nsenter``/``hostname`` pair)."""
    what = f"setting hostname {hostname!r} in the pod's UTS namespace {uts}"
    try:
        call_in_namespace(uts, CLONE_NEWUTS, lambda: socket.sethostname(hostname), what)
    except OSError as exc:
        raise EngineError(f"{what}: {exc.strerror or exc}") from None


class HostPodNamespaces(PodNamespaces):
    """The namespaces are made, named and bound on the files in the holder's mount namespace
    by one short-lived thread of this process (:meth:`NamespaceHolder.unshare`), and
    unmounted the same way; no process is started for either."""

    def __init__(self, holder: NamespaceHolder | None = None) -> None:
        self.holder = holder or NamespaceHolder()

    @staticmethod
    def _legacy(directory: Path) -> bool:
        """Files an older Tidal mounted in the host's table, in the directory itself."""
        return any(is_mounted(f) for f in PodNamespacePaths.under(directory).files())

    def _inner(self, directory: Path) -> str:
        return f"/pods/{pod_key(directory)}"

    def paths(self, directory: Path) -> PodNamespacePaths:
        if self._legacy(directory):
            return PodNamespacePaths.under(directory)
        return PodNamespacePaths.under(self.holder.outer(self.holder.pid(), self._inner(directory)))

    def create(
        self, directory: Path, hostname: str, *, netns: str | None = None
    ) -> PodNamespacePaths:
        pid = self.holder.pid()
        inner = self._inner(directory)
        outer = self.holder.outer(pid, inner)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            outer.mkdir(parents=True, exist_ok=True)
            (outer / "owner").write_text(f"{directory}\n")
            files = {"ipc": f"{inner}/ipc", "uts": f"{inner}/uts"}
            if netns is not None:  # one process for all three (a sandbox's create is hot)
                files = {"net": netns, **files}
            self.holder.unshare(
                pid,
                files,
                hostname,
                what=f"making the pod namespaces ({'network, ' if netns else ''}IPC, "
                f"UTS {hostname!r}) for {directory}",
            )
        except BaseException:
            with contextlib.suppress(EngineError, OSError):
                self.destroy(directory)
            raise
        return PodNamespacePaths.under(outer)

    def exists(self, directory: Path) -> bool:
        if self._legacy(directory):
            return all(is_mounted(f) for f in PodNamespacePaths.under(directory).files())
        pid = self.holder.running()
        if pid is None:
            return False
        outer = self.holder.outer(pid, self._inner(directory))
        return all(is_mounted(f) for f in PodNamespacePaths.under(outer).files())

    def destroy(self, directory: Path) -> None:
        self._destroy_legacy(directory)
        pid = self.holder.running()
        if pid is not None:
            inner = self._inner(directory)
            outer = self.holder.outer(pid, inner)
            for name in ("ipc", "uts"):
                f = self.holder.unbind(pid, f"{inner}/{name}")
                if is_mounted(f):
                    raise EngineError(f"pod namespace {f} is still mounted after umount; retry rm")
                f.unlink(missing_ok=True)
            (outer / "owner").unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                outer.rmdir()
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()

    @staticmethod
    def _destroy_legacy(directory: Path) -> None:
        paths = PodNamespacePaths.under(directory)
        for f in paths.files():
            _unbind_host(f)
            if is_mounted(f):
                raise EngineError(f"pod namespace {f} is still mounted after umount; retry rm")
            f.unlink(missing_ok=True)

    def set_hostname(self, directory: Path, hostname: str) -> None:
        set_uts_hostname(self.paths(directory).uts, hostname)

    def renew_ipc(self, directory: Path) -> None:
        if self._legacy(directory):
            ipc = PodNamespacePaths.under(directory).ipc
            _unbind_host(ipc)
            ipc.touch()
            argv: list[str | Path] = ["unshare", f"--ipc={ipc}", "true"]
        else:
            pid = self.holder.pid()
            inner = f"{self._inner(directory)}/ipc"
            ipc = self.holder.unbind(pid, inner)
            self.holder.unshare(
                pid, {"ipc": inner}, None, what=f"making a fresh pod IPC namespace on {ipc}"
            )
            return
        proc.run(
            argv,
            what=f"making a fresh pod IPC namespace on {ipc}",
            error=EngineError,
            timeout_s=30,
            install_hint="apt-get install util-linux",
        )
