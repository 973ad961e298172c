"""Typed ids shared by several parts, so that a digest is never passed where a name is meant."""

from __future__ import annotations

import hashlib
import re
from typing import NewType

from tidal.errors import ConfigError

Digest = NewType("Digest", str)
"""An OCI content digest, ``sha256:<64 hex>``."""

ContainerId = NewType("ContainerId", str)
InstanceId = NewType("InstanceId", str)
"""An elastic instance (a pod: sandbox plus containers), 32 hex digits."""
NodeName = NewType("NodeName", str)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> Digest:
    """The OCI digest of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def parse_digest(text: str) -> Digest:
    """Validate an OCI sha256 digest string."""
    if not _DIGEST_RE.match(text):
        raise ConfigError(f"not a sha256 digest: {text!r} (expected sha256:<64 hex digits>)")
    return Digest(text)


def short_digest(digest: str, n: int = 12) -> str:
    """``sha256:ab12cd...`` shortened for messages."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:n]}" if hexpart else digest[:n]
