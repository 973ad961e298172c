"""What marks a pulled image: ``origin.json`` beside its manifest, naming where its blobs live.

Apart from :mod:`tidal.blobs.distribution` so that a FUSE server of a local image can tell
the two kinds apart without importing the registry client (its start-up is on the mount path).
"""

from __future__ import annotations

import os
from pathlib import Path

ORIGIN_FILE = "origin.json"


def is_pulled_image(image_dir: str | os.PathLike[str]) -> bool:
    """Whether ``image_dir`` is a pulled (lazy) image rather than one with local blobs."""
    return (Path(image_dir) / ORIGIN_FILE).is_file()
