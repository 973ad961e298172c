"""Settings: one TOML file, a nested dataclass per area, environment overrides.

Each part declares its own frozen dataclass (defaults as module constants, each field with its
unit in the name) and loads it with :func:`load_section`. Precedence, lowest first: the
dataclass defaults, the ``[section]`` table of the TOML file, environment variables
``TIDAL_<SECTION>__<KEY>`` (e.g. ``TIDAL_IMAGE__CHUNK_SIZE_BYTES=1048576``).

The file is ``$TIDAL_CONFIG`` if set, else ``/etc/tidal/tidal.toml`` if it exists; with no
file, the embedded defaults apply.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from tidal.errors import ConfigError

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


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(typ) and isinstance(typ, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float, str, Path):
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (item,) = typing.get_args(typ)[:1] or (str,)
        items = [_coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _build(cls: type[T], table: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def check_settings(
    section: str,
    obj: object,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    ports: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Range checks for a settings dataclass, so a bad value fails at load with its name."""
    for name in positive:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"[{section}] {name} must be positive, got {getattr(obj, name)!r}")
    for name in non_negative:
        if not getattr(obj, name) >= 0:
            raise ConfigError(
                f"[{section}] {name} must not be negative, got {getattr(obj, name)!r}"
            )
    for name in ports:
        if not 0 <= getattr(obj, name) <= 65535:
            raise ConfigError(f"[{section}] {name} {getattr(obj, name)} is not a port (0-65535)")
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
    return _build(cls, table, f"[{section}]")
