"""Registry credentials and the distribution spec's auth challenges (pure, no HTTP here).

Credentials come from a docker-style ``auth.json`` — the file skopeo, podman and ``docker login``
write: ``{"auths": {"registry.example:5000": {"auth": base64("user:password")}}}`` — found at
``$TIDAL_REGISTRY_AUTH``, else ``~/.config/tidal/auth.json``. A password never appears in a repr,
a log line or an error message.

``WWW-Authenticate`` challenges (RFC 7235 syntax: ``Bearer realm="...",service="...",scope="..."``)
are parsed here; the client answers ``Basic`` with the credentials and ``Bearer`` by fetching a
token from the realm, then caches the token per scope until it expires.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tidal.errors import ConfigError, RegistryAuthError

AUTH_FILE_ENV = "TIDAL_REGISTRY_AUTH"
TOKEN_DEFAULT_LIFETIME_S = 60.0
"""The distribution token spec: a token without ``expires_in`` is valid for 60 seconds."""
TOKEN_EXPIRY_MARGIN_S = 5.0


@dataclass(frozen=True)
class Credentials:
    """A user name and a secret; the secret is hidden from ``repr``."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def default_auth_file() -> Path:
    env = os.environ.get(AUTH_FILE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".config" / "tidal" / "auth.json"


def normalize_registry_key(key: str) -> str:
    """``https://reg.example:5000/v2/`` -> ``reg.example:5000`` (auth.json keys vary)."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0].lower()


def parse_auth_file(text: str, name: str) -> dict[str, Credentials]:
    """Registry address -> credentials, from the text of an ``auth.json``."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"registry auth file {name} is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"registry auth file {name} nests JSON too deeply") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(f'registry auth file {name} has no "auths" object')
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"registry auth file {name}: entry for {key!r} is not an object")
        if "auth" in entry:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, TypeError):  # binascii.Error, UnicodeDecodeError, non-ASCII
                raise ConfigError(
                    f"registry auth file {name}: the auth of {key!r} is not base64 of user:password"
                ) from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ConfigError(
                    f"registry auth file {name}: the auth of {key!r} lacks the ':' between user and password"
                )
            out[normalize_registry_key(key)] = Credentials(user, password)
        elif "username" in entry and "password" in entry:
            out[normalize_registry_key(key)] = Credentials(
                str(entry["username"]), str(entry["password"])
            )
    return out


def load_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``) from the auth file, or ``None``.

    A missing file means anonymous access; an unreadable or malformed one is a ConfigError.
    """
    path = path if path is not None else default_auth_file()
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"registry auth file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read registry auth file {path}: {exc.strerror}") from None
    return parse_auth_file(text, str(path)).get(normalize_registry_key(registry))


def encode_auth_file(entries: dict[str, Credentials]) -> str:
    """The ``auth.json`` text for ``entries`` (what ``tidal`` or a test writes for skopeo)."""
    doc = {
        "auths": {
            k: {"auth": base64.b64encode(f"{c.username}:{c.password}".encode()).decode()}
            for k, c in entries.items()
        }
    }
    return json.dumps(doc, indent=2) + "\n"


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str]


_ITEM_RE = re.compile(
    r"""\s*,?\s*(?:([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)|([A-Za-z][A-Za-z0-9_.-]*))"""
)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse ``Basic realm="x", Bearer realm="y",service="z",scope="a:b:pull,push"``.

    Quoted values may contain commas (scopes do), so this is a small scanner, not a split:
    a bare word starts a new challenge, ``key=value`` items belong to the current one.
    """
    challenges: list[Challenge] = []
    pos, text = 0, header.strip()
    while pos < len(text):
        m = _ITEM_RE.match(text, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        if m.group(3):
            challenges.append(Challenge(m.group(3).lower(), {}))
        elif challenges:
            value = m.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            challenges[-1].params[m.group(1).lower()] = value
    return challenges


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float


def parse_token_response(body: bytes, now: float, realm: str) -> Token:
    """The token from a token endpoint's JSON (``token`` or ``access_token``, ``expires_in``)."""
    try:
        doc = json.loads(body)
        value = doc.get("token") or doc.get("access_token")
        lifetime = float(doc.get("expires_in") or TOKEN_DEFAULT_LIFETIME_S)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        value = None
        lifetime = 0.0
    if not value or not isinstance(value, str):
        raise RegistryAuthError(f"token endpoint {realm} answered without a token")
    return Token(value, now + lifetime)


class TokenCache:
    """Bearer tokens per (realm, service, scope), dropped a little before they expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            tok = self._tokens.get(key)
            if tok is None:
                return None
            if tok.expires_at - TOKEN_EXPIRY_MARGIN_S <= self._clock():
                del self._tokens[key]
                return None
            return tok.value

    def put(self, key: tuple[str, str, str], token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._tokens.pop(key, None)

    def now(self) -> float:
        return self._clock()
