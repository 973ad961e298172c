"""Image references: ``[registry/]repository[:tag][@digest]``, as docker, skopeo and podman read them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tidal.errors import ConfigError
from tidal.ids import Digest, parse_digest

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ImageReference:
    """A parsed reference; ``reference`` is the digest if there is one, else the tag."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: Digest) -> ImageReference:
        return ImageReference(self.registry, self.repository, self.tag, digest)

    @classmethod
    def parse(cls, text: str, *, default_registry: str = DEFAULT_REGISTRY) -> ImageReference:
        """Parse ``127.0.0.1:5000/tidal/app:v1`` or ``reg.example/app@sha256:...``.

        The first component is a registry if it has a ``.`` or ``:`` or is ``localhost``,
        as docker decides; otherwise the registry is ``default_registry`` (docker.io, where
        a one-component name means ``library/NAME``).
        """
        raw = _strip_scheme(text)
        rest, _, digest_text = raw.partition("@")
        digest = parse_digest(digest_text) if digest_text else None
        first, _, remainder = rest.partition("/")
        if names_registry(text):
            registry, path = first, remainder
        else:
            registry, path = default_registry, rest
        name, _, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if not name:
            raise ConfigError(
                f"image reference {text!r} has no repository; use e.g. HOST:PORT/NAME:TAG"
            )
        if registry == DEFAULT_REGISTRY and "/" not in name:
            name = f"library/{name}"
        if not _REPO_RE.match(name):
            raise ConfigError(
                f"image reference {text!r}: repository {name!r} must be lower-case "
                "letters, digits and separators (. _ - /)"
            )
        if tag and not _TAG_RE.match(tag):
            raise ConfigError(f"image reference {text!r}: {tag!r} is not a valid tag")
        if not tag and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, name, tag or None, digest)


def _strip_scheme(text: str) -> str:
    raw = text.strip()
    if raw.startswith(("docker://", "oci://")):
        raw = raw.split("://", 1)[1]
    return raw


def names_registry(text: str) -> bool:
    """Whether a reference's first component is a registry host (docker's rule)."""
    first, sep, _ = _strip_scheme(text).partition("@")[0].partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")
