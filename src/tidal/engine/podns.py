"""A pod's IPC and UTS namespaces as files, made before any of its containers starts.

Under runc and crun the containers of a pod share the network, IPC and UTS namespaces of its
sandbox container. They used to join IPC and UTS through ``/proc/<sandbox pid>/ns/...``, so no
member could start before the sandbox ran: an instance cost two container starts in a row.
Bind-mounted on files (as ``ip netns`` keeps the network namespace), the namespaces exist
from the sandbox's create on, and every container of the pod, the sandbox included, joins
them by path: all of them start at once. The files live in the sandbox container's
directory (``<container dir>/ns/{ipc,uts}``) from its create to its ``rm``, like its netns;
the pod's hostname is set in the UTS namespace once, when it is made (the bundles of
containers that join it carry none).

Runtimes whose pods share one sandbox kernel (runsc: ``RuntimeCapabilities.pod_sandbox``)
need none of this; their members are put into the sandbox by annotations.

One adapter, :class:`PodNamespaces`: :class:`HostPodNamespaces` runs util-linux ``unshare``
and ``umount`` through :func:`tidal.proc.run`; :class:`tidal.testing.engine.FakePodNamespaces`
keeps plain files.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from tidal import proc
from tidal.errors import EngineError

POD_NS_DIR = "ns"
"""Below a sandbox container's directory: where its pod's namespace files are."""
UMOUNT_TRIES = 4


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
    """Makes and removes a pod's persistent IPC and UTS namespaces in a directory."""

    @abstractmethod
    def create(self, directory: Path, hostname: str) -> PodNamespacePaths:
        """Make both namespaces, the UTS one with ``hostname``; on failure nothing is left."""

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
        of the last one's SysV objects or POSIX message queues (the pause process keeps the
        old one, which it never uses; members join the file)."""


def _is_mounted(path: Path) -> bool:
    """A namespace bind mount is on another device (nsfs) than the directory holding it."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except FileNotFoundError:
        return False


class HostPodNamespaces(PodNamespaces):
    """``unshare --ipc=FILE --uts=FILE hostname NAME``: the namespaces are made, bound on
    the files and named in one short-lived process (~10 ms)."""

    def create(self, directory: Path, hostname: str) -> PodNamespacePaths:
        paths = PodNamespacePaths.under(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for f in paths.files():
            f.touch()  # unshare binds onto an existing file
        try:
            proc.run(
                [
                    "unshare",
                    f"--ipc={paths.ipc}",
                    f"--uts={paths.uts}",
                    "hostname",
                    hostname,
                ],
                what=f"making the pod namespaces (IPC, UTS {hostname!r}) in {directory}",
                error=EngineError,
                timeout_s=30,
                install_hint="apt-get install util-linux hostname",
            )
        except BaseException:
            with contextlib.suppress(EngineError, OSError):
                self.destroy(directory)
            raise
        return paths

    def exists(self, directory: Path) -> bool:
        return all(_is_mounted(f) for f in PodNamespacePaths.under(directory).files())

    def destroy(self, directory: Path) -> None:
        paths = PodNamespacePaths.under(directory)
        for f in paths.files():
            for _ in range(UMOUNT_TRIES):  # a retried create may have bound it twice over
                if not _is_mounted(f):
                    break
                proc.run(
                    ["umount", f],
                    what=f"unmounting the pod namespace {f}",
                    error=EngineError,
                    timeout_s=30,
                )
            if _is_mounted(f):
                raise EngineError(f"pod namespace {f} is still mounted after umount; retry rm")
            f.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()

    def set_hostname(self, directory: Path, hostname: str) -> None:
        uts = PodNamespacePaths.under(directory).uts
        proc.run(
            ["nsenter", f"--uts={uts}", "hostname", hostname],
            what=f"setting hostname {hostname!r} in the pod's UTS namespace {uts}",
            error=EngineError,
            timeout_s=30,
            install_hint="apt-get install util-linux hostname",
        )

    def renew_ipc(self, directory: Path) -> None:
        ipc = PodNamespacePaths.under(directory).ipc
        for _ in range(UMOUNT_TRIES):
            if not _is_mounted(ipc):
                break
            proc.run(
                ["umount", ipc],
                what=f"unmounting the pod IPC namespace {ipc}",
                error=EngineError,
                timeout_s=30,
            )
        ipc.touch()
        proc.run(
            ["unshare", f"--ipc={ipc}", "true"],
            what=f"making a fresh pod IPC namespace on {ipc}",
            error=EngineError,
            timeout_s=30,
            install_hint="apt-get install util-linux",
        )
