"""One validation path from decoded TOML/YAML/JSON to frozen dataclasses (core).

:func:`convert` turns a raw mapping into a dataclass: ``msgspec`` does the typing (ints,
floats, bools, ``Literal`` choices, unions, nested dataclasses, lists, mappings, paths); this
module adds what it leaves out for dataclasses and what Tidal's messages need: unknown keys
fail (at any depth), and every failure becomes one :class:`~tidal.errors.ConfigError` (or the
caller's subclass) naming the file or section, the key path, the value and the fix.

Range rules are ``Annotated`` markers (:data:`PositiveInt`, :data:`Port`, ...) that
:func:`check` reads. :func:`convert` checks them on every dataclass it builds; a dataclass that
is also built in code calls :func:`check` from ``__post_init__`` (as every part's settings do),
so a value is checked the same way whether it came from a file or from code. They are
Tidal's own markers rather than ``msgspec.Meta`` because ``Meta`` is enforced only while
decoding (never on direct construction) and reports neither the value nor Tidal's wording.

Why msgspec rather than pydantic: the same typing for ~20 ms of import instead of ~250 ms, and
settings are loaded by most CLI commands (see ``benchmarks/bench_cli.py``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from tidal.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """A range rule on a number: ``low < value`` / ``low <= value``, ``value <= high``."""

    says: str
    """The message after the key path; ``{key}`` and ``{value}`` are filled in."""
    gt: float | None = None
    ge: float | None = None
    le: float | None = None

    def holds(self, value: Any) -> bool:
        if value is None:
            return True  # an optional setting left unset
        if self.gt is not None and not value > self.gt:
            return False
        if self.ge is not None and not value >= self.ge:
            return False
        return not (self.le is not None and not value <= self.le)


POSITIVE = Bound("{key} must be positive, got {value!r}", gt=0)
NON_NEGATIVE = Bound("{key} must not be negative, got {value!r}", ge=0)
PORT = Bound("{key} {value} is not a port (0-65535)", ge=0, le=65535)
FRACTION = Bound("{key} {value} must be a fraction in (0, 1]", gt=0, le=1)

PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
Port = Annotated[int, PORT]
Fraction = Annotated[float, FRACTION]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`(?:, got `[^`]+`)?")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_TYPE_NAMES = {"object": "a mapping", "array": "a list", "bool": "true/false", "str": "str"}


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """``Annotated[X, m...]`` -> ``(X, (m...))``; ``X | None`` -> ``X`` (for walking)."""
    extras: tuple[Any, ...] = ()
    while True:
        if typing.get_origin(tp) is Annotated:
            tp, *more = typing.get_args(tp)
            extras += tuple(more)
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp, extras


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return hints


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _choices(tp: Any) -> tuple[Any, ...] | None:
    base, _ = _unwrap(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _violation(obj: object, path: str) -> str | None:
    """The first broken :class:`Bound` or ``Literal`` choice on ``obj``'s own fields."""
    for name, tp in _hints(type(obj)).items():
        if name not in obj.__dataclass_fields__:  # type: ignore[attr-defined]
            continue
        value = getattr(obj, name)
        key = _join(path, name)
        _, extras = _unwrap(tp)
        for bound in extras:
            if isinstance(bound, Bound) and not bound.holds(value):
                return bound.says.format(key=key, value=value)
        allowed = _choices(tp)
        if allowed is not None and value not in allowed:
            return f"{key} {value!r}: choose one of {', '.join(map(str, allowed))}"
    return None


def check(
    obj: object, where: str, *, sep: str = " ", error: type[ConfigError] = ConfigError
) -> None:
    """Check every :class:`Bound` and ``Literal`` choice on ``obj``'s fields; the first broken
    one raises ``error`` as ``{where}{sep}{message}`` (``[qos] api_port 70000 is not a port``).
    Dataclasses call it from ``__post_init__``; :func:`convert` also runs it on every
    dataclass it builds, nested ones included."""
    problem = _violation(obj, "")
    if problem:
        raise error(f"{where}{sep}{problem}")


def _check_tree(obj: Any, path: str) -> str | None:
    """:func:`_violation` on ``obj`` and every dataclass below it, with key paths."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        problem = _violation(obj, path)
        if problem:
            return problem
        for f in dataclasses.fields(obj):
            problem = _check_tree(getattr(obj, f.name), _join(path, f.name))
            if problem:
                return problem
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            problem = _check_tree(item, f"{path}[{i}]")
            if problem:
                return problem
    elif isinstance(obj, dict):
        for key, item in obj.items():
            problem = _check_tree(item, _join(path, str(key)))
            if problem:
                return problem
    return None


def _unknown_keys(
    doc: Any, tp: Any, path: str, noun: str
) -> tuple[str, list[str], list[str]] | None:
    """The first mapping in ``doc`` with keys its dataclass does not have: (path, them, known)."""
    base, _ = _unwrap(tp)
    if dataclasses.is_dataclass(base) and isinstance(base, type):
        if not isinstance(doc, Mapping):
            return None  # msgspec reports the wrong type
        known = _field_names(base)
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            return path, unknown, sorted(known)
        hints = _hints(base)
        for key, value in doc.items():
            found = _unknown_keys(value, hints[key], _join(path, str(key)), noun)
            if found:
                return found
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple) and isinstance(doc, list | tuple):
        args = typing.get_args(base)
        item = args[0] if args else Any
        for i, value in enumerate(doc):
            found = _unknown_keys(value, item, f"{path}[{i}]", noun)
            if found:
                return found
    if origin is dict and isinstance(doc, Mapping):
        args = typing.get_args(base)
        for key, value in doc.items():
            found = _unknown_keys(value, args[1] if args else Any, _join(path, str(key)), noun)
            if found:
                return found
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _lenient(doc: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """Environment variables are strings: ``no``/``off`` for false, ``a,b`` for a list, an
    empty string for unset."""
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        tp = hints.get(key)
        if tp is None or not isinstance(value, str):
            out[key] = value
            continue
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
            None
        ) in typing.get_args(tp)
        base, _ = _unwrap(tp)
        if value == "" and optional:
            out[key] = None
        elif base is bool and value.lower() in _TRUE + _FALSE:
            out[key] = value.lower() in _TRUE
        elif typing.get_origin(base) in (list, tuple):
            out[key] = [v for v in value.split(",") if v]
        else:
            out[key] = value
    return out


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is Path and isinstance(obj, str):
        return Path(obj)
    raise TypeError(f"Expected `{getattr(tp, '__name__', tp)}`, got `{type(obj).__name__}`")


def _lookup(doc: Any, path: str) -> tuple[bool, Any]:
    """The value at a msgspec path such as ``.containers[0].engine`` (found, value)."""
    value = doc
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, value


def _leaf_type(cls: type, path: str) -> Any:
    tp: Any = cls
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        base, _ = _unwrap(tp)
        if index:
            args = typing.get_args(base)
            tp = args[0] if args else Any
        elif dataclasses.is_dataclass(base) and isinstance(base, type):
            tp = _hints(base).get(name, Any)
        else:
            args = typing.get_args(base)
            tp = args[1] if len(args) == 2 else Any
    return tp


def convert(
    doc: Any,
    cls: type[T],
    *,
    where: str,
    sep: str = ": ",
    noun: str = "key",
    type_says: str = "{key}: expected {type}, got {value!r}",
    lenient: bool = False,
    error: type[ConfigError] = ConfigError,
) -> T:
    """Build dataclass ``cls`` from ``doc`` (a decoded mapping), or raise ``error``.

    Messages read ``{where}{sep}{key path} ...``: unknown keys as ``unknown {noun}(s) [...];
    known: [...]``, a wrong type as ``type_says``. ``lenient`` accepts strings for numbers,
    booleans and lists (environment variables); otherwise types must match (an int is
    accepted for a float). Errors raised by ``__post_init__`` (a :class:`ConfigError`) pass
    through unchanged.
    """
    if not isinstance(doc, Mapping):
        raise error(f"{where}{sep}expected a mapping, got {doc!r}")
    unknown = _unknown_keys(doc, cls, "", noun)
    if unknown:
        path, names, known = unknown
        at = f"{path}: " if path else ""
        raise error(f"{where}{sep}{at}unknown {noun}(s) {names}; known: {known}")
    if lenient:
        doc = _lenient(doc, cls)
    import msgspec  # here, not at the top: a CLI command that loads no settings never pays it

    try:
        obj = msgspec.convert(doc, cls, strict=not lenient, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise error(f"{where}{sep}{_describe(str(exc), doc, cls, type_says, cause)}") from None
    problem = _check_tree(obj, "")
    if problem:
        raise error(f"{where}{sep}{problem}")
    return obj


def _describe(
    message: str, doc: Any, cls: type, type_says: str, cause: BaseException | None
) -> str:
    m = _AT.match(message)
    what, path = (m.group("what"), m.group("path") or "") if m else (message, "")
    key = path.lstrip(".")
    missing = _MISSING.match(what)
    if missing:
        return f"{key + ': ' if key else ''}missing [{missing.group('name')!r}]"
    found, value = _lookup(doc, path)
    if cause is not None and not _EXPECTED.match(str(cause)):  # from a __post_init__
        return f"{key + ': ' if key else ''}{cause}"
    allowed = _choices(_leaf_type(cls, path))
    if allowed is not None and found:
        return f"{key} {value!r}: choose one of {', '.join(map(str, allowed))}"
    expected = _EXPECTED.match(what)
    if expected and found:
        names = [w for w in expected.group("want").split(" | ") if w != "null"]
        want = " or ".join(_TYPE_NAMES.get(w, w) for w in names)
        return type_says.format(key=key, type=want, value=value)
    return f"{key + ': ' if key else ''}{what}"
