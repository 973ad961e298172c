"""The optional dependency groups: one list in tidal.extras, the same in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tidal.errors import MissingExtraError, TidalError
from tidal.extras import DIST_MODULES, EXTRAS, missing_extra_error, require_extra

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_extras_match_pyproject() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        dists = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0] for req in declared[extra]}
        names = {DIST_MODULES.get(d, d) for d in dists}
        assert names == set(modules), extra
    core = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0] for req in project["dependencies"]}
    assert not core & {m for ms in EXTRAS.values() for m in ms}, "an extra's module is in core"


def test_missing_module_of_an_extra_is_one_line_naming_it() -> None:
    err = missing_extra_error(
        ModuleNotFoundError("No module named 'kubernetes'", name="kubernetes.client")
    )
    assert isinstance(err, MissingExtraError) and isinstance(err, TidalError)
    assert str(err) == (
        "this command needs kubernetes, which is not installed; it comes with Tidal's 'sched' "
        "extra: pip install 'tidal[sched]'"
    )
    assert missing_extra_error(ModuleNotFoundError("No module named 'yaml'", name="yaml")) is None


def test_require_extra_names_the_feature() -> None:
    require_extra("sched", "tidal sched simulate")  # installed by make deps
    with pytest.raises(
        MissingExtraError, match=r"^tidal qos experiment needs no_such_mod_x1.*tidal\[bench\]"
    ):
        require_extra("bench", "tidal qos experiment", ("no_such_mod_x1",))
