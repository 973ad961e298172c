"""Where the snapshotter gets Tidal images and their mounts: one small protocol, so that the
gRPC service does not care who mounts. :class:`LocalBackend` implements it over
:class:`~tidal.node.images.ImageStore` (metadata-only pulls) and the node's mounts (FUSE ->
loop -> ext4): given the :class:`~tidal.node.service.NodeService` it runs in (``tidal node
serve --snapshotter-socket``), it mounts through it in-process, so every container's image is
served from the node service's threads and survives its restart; standalone (``tidal
snapshotter serve``) it asks the node service over its socket when one runs, else mounts with
a FUSE server process per mount.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tidal.blockdev import ext4, mounts
from tidal.errors import MountNotFoundError
from tidal.node import client as node_client
from tidal.node.images import ImageStore
from tidal.snapshotter.model import RemoteImage

if TYPE_CHECKING:
    from tidal.node.service import NodeService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PulledImage:
    """A Tidal image whose metadata is on the node (its layers come lazily)."""

    reference: str
    manifest_digest: str
    layer_digests: tuple[str, ...]


class ImageBackend(Protocol):
    """What the snapshotter needs of images and mounts."""

    def pull(self, reference: str) -> PulledImage:
        """Fetch the image's metadata (no layer data) and keep it on the node."""
        ...

    def mount(self, image: RemoteImage, target: Path) -> None:
        """Mount the whole image read-only at ``target`` (an empty directory)."""
        ...

    def unmount(self, target: Path) -> None:
        """Undo :meth:`mount`; a target with nothing mounted is not an error."""
        ...

    def is_mounted(self, target: Path) -> bool:
        """Whether ``target`` has a live mount of an image (its server alive)."""
        ...


class LocalBackend:
    """:class:`ImageBackend` in this process: the node's image store and Tidal's mounts."""

    def __init__(self, store: ImageStore | None = None, node: NodeService | None = None) -> None:
        self.node = node
        self.store = store or (node.images if node is not None else ImageStore())

    def pull(self, reference: str) -> PulledImage:
        stored = self.store.pull(reference)
        return PulledImage(
            reference=stored.reference,
            manifest_digest=str(stored.manifest_digest),
            layer_digests=tuple(str(d) for d in stored.blob_digests),
        )

    def _image_dir(self, image: RemoteImage) -> Path:
        path = self.store.image_dir(image.manifest_digest)  # type: ignore[arg-type]
        if not (path / "manifest.json").is_file():
            log.info("image %s is no longer in the store; pulling it again", image.reference)
            self.store.pull(image.reference)
        return path

    def mount(self, image: RemoteImage, target: Path) -> None:
        if self.node is not None:
            self.node.mount(str(self._image_dir(image)), str(target))
        else:
            node_client.mount_image(self._image_dir(image), target)

    def unmount(self, target: Path) -> None:
        try:
            if self.node is not None:
                self.node.unmount(str(target), force=True)
            else:
                node_client.unmount(target, force=True)
        except MountNotFoundError:
            if ext4.is_mountpoint(target):
                raise

    def is_mounted(self, target: Path) -> bool:
        try:
            info = mounts.find_mount(target)
        except MountNotFoundError:
            return False
        return ext4.is_mountpoint(target) and mounts.server_alive(info)
