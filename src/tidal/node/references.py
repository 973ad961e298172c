"""How ``tidal run IMAGE`` reads IMAGE, and the pull policies: no imports beyond the core, so
the engine's spec (loaded by every CLI command) can validate without the registry client."""

from __future__ import annotations

from pathlib import Path

from tidal.errors import ConfigError

PULL_POLICIES = ("missing", "always", "never")
"""``missing``: pull when the node lacks the reference (the default, as docker and podman);
``always``: resolve the reference at the registry again; ``never``: the node's copy only."""


def check_pull_policy(policy: str) -> str:
    if policy not in PULL_POLICIES:
        raise ConfigError(f"unknown pull policy {policy!r}; use {', '.join(PULL_POLICIES)}")
    return policy


def looks_like_path(image: str) -> bool:
    """Whether IMAGE names a directory (a Tidal image or a rootfs, as before references):
    it exists on disk, or is spelled as a path (``/``, ``./``, ``../``, ``~``)."""
    return image.startswith(("/", "./", "../", "~")) or image in (".", "..") or Path(image).exists()
