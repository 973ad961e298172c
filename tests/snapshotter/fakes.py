"""A fake image backend: records pulls and "mounts" by writing a marker file."""

from __future__ import annotations

import threading
from pathlib import Path

from tidal.errors import ImageReferenceNotFoundError
from tidal.snapshotter.backend import PulledImage
from tidal.snapshotter.model import RemoteImage

MARKER = "MOUNTED-IMAGE"


class FakeBackend:
    def __init__(self, images: dict[str, PulledImage] | None = None) -> None:
        self.images = dict(images or {})
        self.pulls: list[str] = []
        self.mounted: dict[Path, RemoteImage] = {}
        self.unmounts: list[Path] = []
        self.mount_error: Exception | None = None
        self.mount_gate: threading.Event | None = None
        """When set, :meth:`mount` waits for it (a slow mount, for concurrency tests)."""
        self.mount_started = threading.Event()

    def pull(self, reference: str) -> PulledImage:
        self.pulls.append(reference)
        try:
            return self.images[reference]
        except KeyError:
            raise ImageReferenceNotFoundError(f"image {reference} is not in its registry") from None

    def mount(self, image: RemoteImage, target: Path) -> None:
        assert target not in self.mounted, f"{target} mounted twice"
        self.mount_started.set()
        if self.mount_gate is not None:
            assert self.mount_gate.wait(10), "the test never opened the gate"
        if self.mount_error is not None:
            raise self.mount_error
        (target / MARKER).write_text(image.manifest_digest)
        self.mounted[target] = image

    def unmount(self, target: Path) -> None:
        self.unmounts.append(target)
        if self.mounted.pop(target, None) is not None:
            (target / MARKER).unlink()

    def is_mounted(self, target: Path) -> bool:
        return target in self.mounted
