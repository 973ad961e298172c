"""tidal.validation: one path from decoded files to frozen dataclasses, with Tidal's wording."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tidal.errors import ConfigError, RuleError
from tidal.validation import Fraction, Port, PositiveInt, check, convert


@dataclass(frozen=True)
class _Item:
    name: str
    weight: Fraction = 0.5


@dataclass(frozen=True)
class _Doc:
    port: Port = 80
    workers: PositiveInt = 2
    mode: Literal["fast", "safe"] = "safe"
    verbose: bool = False
    root: Path | None = None
    tags: tuple[str, ...] = ()
    items: list[_Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self, "[demo]")


def _fails(doc: object, message: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        convert(doc, _Doc, where="[demo]", sep=" ", **kw)  # type: ignore[arg-type]
    assert str(info.value) == message
    return str(info.value)


def test_a_good_document_becomes_the_dataclass() -> None:
    got = convert(
        {"port": 8080, "root": "/srv", "tags": ["a"], "items": [{"name": "x", "weight": 1}]},
        _Doc,
        where="[demo]",
    )
    assert got == _Doc(port=8080, root=Path("/srv"), tags=("a",), items=[_Item("x", 1.0)])
    assert isinstance(got.items[0].weight, float)


def test_ranges_and_choices_fail_with_the_key_and_value() -> None:
    _fails({"port": 70000}, "[demo] port 70000 is not a port (0-65535)")
    _fails({"workers": 0}, "[demo] workers must be positive, got 0")
    _fails({"mode": "quick"}, "[demo] mode 'quick': choose one of fast, safe")


def test_direct_construction_is_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"^\[demo\] port -1 is not a port"):
        _Doc(port=-1)
    with pytest.raises(ConfigError, match=r"^\[demo\] mode 'x': choose one of fast, safe$"):
        _Doc(mode="x")  # type: ignore[arg-type]


def test_unknown_keys_fail_at_any_depth() -> None:
    _fails(
        {"colour": 1},
        "[demo] unknown setting(s) ['colour']; known: "
        "['items', 'mode', 'port', 'root', 'tags', 'verbose', 'workers']",
        noun="setting",
    )
    _fails(
        {"items": [{"name": "a"}, {"name": "b", "heavy": True}]},
        "[demo] items[1]: unknown key(s) ['heavy']; known: ['name', 'weight']",
    )


def test_wrong_types_and_missing_fields_name_the_path() -> None:
    _fails({"workers": "many"}, "[demo] workers: expected int, got 'many'")
    _fails({"items": {"name": "a"}}, "[demo] items: expected a list, got {'name': 'a'}")
    _fails({"items": [{}]}, "[demo] items[0]: missing ['name']")
    _fails({"verbose": "no"}, "[demo] verbose: expected true/false, got 'no'")
    _fails(
        {"items": [{"name": "a", "weight": 2}]},
        "[demo] items[0].weight 2.0 must be a fraction in (0, 1]",
    )
    with pytest.raises(RuleError, match=r"^r.yaml: parameter workers must be int, got 1.5$"):
        convert(
            {"workers": 1.5},
            _Doc,
            where="r.yaml",
            type_says="parameter {key} must be {type}, got {value!r}",
            error=RuleError,
        )


def test_lenient_reads_environment_strings() -> None:
    got = convert(
        {"port": "8080", "verbose": "off", "tags": "a,b", "root": ""},
        _Doc,
        where="[demo]",
        lenient=True,
    )
    assert got == _Doc(port=8080, verbose=False, tags=("a", "b"), root=None)
    _fails({"port": "70000"}, "[demo] port 70000 is not a port (0-65535)", lenient=True)


def test_defaults_only_settings_do_not_import_msgspec(tmp_path: Path) -> None:
    """Most CLI runs have no config file: their start-up must not pay for the converter."""
    import subprocess
    import sys

    code = (
        "import sys; from tidal.qos.settings import load_qos_settings; "
        "s = load_qos_settings(); print(s.api_port, 'msgspec' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", "TIDAL_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["7460", "False"]
