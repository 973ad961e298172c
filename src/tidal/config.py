"""Settings: one TOML file, a nested dataclass per area, environment overrides.

Each part declares its own frozen dataclass (defaults as module constants, each field with its
unit in the name, range rules as ``Annotated`` markers from :mod:`tidal.validation` checked in
``__post_init__``) and loads it with :func:`load_section`, which goes through
:func:`tidal.validation.convert`: unknown keys, wrong types and out-of-range values fail at
load with the section and key named. Precedence, lowest first: the
dataclass defaults, the ``[section]`` table of the TOML file, environment variables
``TIDAL_<SECTION>__<KEY>`` (e.g. ``TIDAL_IMAGE__CHUNK_SIZE_BYTES=1048576``).

The file is ``$TIDAL_CONFIG`` if set, else ``/etc/tidal/tidal.toml`` if it exists; with no
file, the embedded defaults apply.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from tidal.errors import ConfigError
from tidal.validation import NON_NEGATIVE, PORT, POSITIVE, convert

DEFAULT_CONFIG_PATH = Path("/etc/tidal/tidal.toml")
DEFAULT_DATA_ROOT = Path("/var/lib/tidal")
"""Where node state lives (images, chunk cache, containers) unless ``TIDAL_DATA_ROOT`` says otherwise."""

T = TypeVar("T")


def data_root() -> Path:
    """The node's data directory: ``$TIDAL_DATA_ROOT`` or :data:`DEFAULT_DATA_ROOT`."""
    return Path(os.environ.get("TIDAL_DATA_ROOT", str(DEFAULT_DATA_ROOT)))


def config_path() -> Path | None:
    env = os.environ.get("TIDAL_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; unset TIDAL_CONFIG or create it"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def check_settings(
    section: str,
    obj: object,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    ports: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Range checks by field name, with the wording of :mod:`tidal.validation`'s rules.

    Superseded by ``Annotated`` markers on the fields and :func:`tidal.validation.check`
    (what every part's settings use); kept only so that a branch written against it still
    works until it is merged, then to be removed.
    """
    for names, rule in ((positive, POSITIVE), (non_negative, NON_NEGATIVE), (ports, PORT)):
        for name in names:
            value = getattr(obj, name)
            if not rule.holds(value):
                raise ConfigError(f"[{section}] {rule.says.format(key=name, value=value)}")
    for name, allowed in (choices or {}).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(
                f"[{section}] {name} {getattr(obj, name)!r}: choose one of {', '.join(allowed)}"
            )


def load_section(
    section: str, cls: type[T], path: Path | None = None, env: dict[str, str] | None = None
) -> T:
    """Build ``cls`` from defaults, the TOML ``[section]`` table and ``TIDAL_<SECTION>__*`` variables."""
    env = dict(os.environ) if env is None else env
    doc = read_toml(path if path is not None else config_path())
    table: dict[str, Any] = dict(doc.get(section, {}))
    prefix = f"TIDAL_{section.upper()}__"
    for key, value in env.items():
        if key.startswith(prefix):
            table[key[len(prefix) :].lower()] = value
    if not table:
        # Defaults only (no file section, no variables: most CLI runs): nothing to convert, and
        # msgspec's import is not paid; ``__post_init__`` still checks the values.
        return cls()
    return convert(table, cls, where=f"[{section}]", sep=" ", noun="setting", lenient=True)
