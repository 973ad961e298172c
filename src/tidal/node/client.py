"""Client of the node service (``tidal node serve``) on its unix socket.

:func:`running_node` is how the CLI and the engine decide where a pull or a mount happens: the
node service when it runs (no interpreter per mount, one process for all FUSE devices), in the
calling process otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidal.blockdev import mounts as blockdev_mounts
from tidal.blockdev.mounts import MountInfo
from tidal.config import data_root
from tidal.errors import DaemonUnavailableError, MountError
from tidal.service.client import SocketClient


def socket_path() -> Path:
    """Where the node service listens: ``$TIDAL_DATA_ROOT/node.sock``."""
    return data_root() / "node.sock"


class NodeClient(SocketClient):
    """The node service's verbs over its socket (see :class:`tidal.node.service.NodeService`)."""

    what = "the node service"
    start_hint = "tidal node serve"
    fallback = MountError

    def __init__(self, socket_path: Path, **kw: Any) -> None:
        super().__init__(socket_path, base="/v1/node", **kw)

    def __enter__(self) -> NodeClient:
        return self

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", "/status").json()
        return data

    def pull(self, reference: str) -> dict[str, Any]:
        data: dict[str, Any] = self._request(
            "POST", "/images", json={"reference": reference}
        ).json()
        return data

    def mount(
        self,
        image: str | Path,
        target: str | Path,
        *,
        writable_dir: str | Path | None = None,
        pull: str = "missing",
    ) -> MountInfo:
        body = {
            "image": str(image),
            "target": str(Path(target).resolve()),
            "writable_dir": str(Path(writable_dir).resolve()) if writable_dir else None,
            "pull": pull,
        }
        return MountInfo(**self._request("POST", "/mounts", json=body).json())

    def unmount(self, target: str | Path, *, force: bool = False) -> None:
        body = {"target": str(Path(target).resolve()), "force": force}
        self._request("POST", "/mounts/unmount", json=body)

    def mounts(self) -> list[MountInfo]:
        return [MountInfo(**d) for d in self._request("GET", "/mounts").json()]


def running_node(path: Path | None = None) -> NodeClient | None:
    """A client of the node service if one answers on its socket, else None."""
    path = path if path is not None else socket_path()
    if not path.exists():
        return None
    client = NodeClient(path)
    try:
        client.status()
    except DaemonUnavailableError:
        client.close()
        return None
    return client


def mount_image(
    image_dir: str | Path, target: str | Path, *, writable_dir: str | Path | None = None
) -> MountInfo:
    """Mount through the node service when it runs (served from its process), else here (a
    FUSE server process of the mount's own)."""
    node = running_node()
    if node is None:
        return blockdev_mounts.mount_image(image_dir, target, writable_dir=writable_dir)
    with node:
        return node.mount(image_dir, target, writable_dir=writable_dir)


def unmount(target: str | Path, *, force: bool = False) -> None:
    """Unmount ``target``: by the node service if it serves the mount, else here."""
    info = blockdev_mounts.find_mount(target)
    if info.fd_name is not None and blockdev_mounts.server_alive(info):
        with NodeClient(socket_path()) as node:
            node.unmount(target, force=force)
        return
    blockdev_mounts.unmount(target, force=force)
