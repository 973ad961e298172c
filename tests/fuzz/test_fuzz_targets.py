"""The fuzz targets under fuzz/: seeds parse, saved findings stay fixed, a short run finds nothing.

Each target's contract is that only TidalError subclasses escape (fuzz/targets.py). The long
runs are documented in fuzz/README.md; here every target gets its seeds (which must parse
cleanly, or the fuzzer would start outside the format), its committed regression inputs, and a
short coverage-guided run with atheris in a subprocess (atheris must own the process).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tidal.errors import TidalError

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

SHORT_RUN_S = 3
SEED = 1
"""A fixed seed: libFuzzer's mutations are then one sequence, of which a slower machine runs a
shorter prefix, so a short run in CI finds only what a longer run here with the same seed found
first (random seeds belong to the long runs in fuzz/README.md, whose findings get fixed and kept
as regressions)."""


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_seeds_parse_cleanly(name: str) -> None:
    seeds = list(targets.seeds(name))
    assert seeds, f"{name} has no seeds"
    for seed in seeds:
        targets.TARGETS[name](seed)


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_saved_findings_raise_only_tidal_errors(name: str) -> None:
    for path in sorted((FUZZ / "regressions" / name).glob("*")):
        try:
            targets.TARGETS[name](path.read_bytes())
        except TidalError as exc:
            assert "\n" not in str(exc).strip(), (path.name, str(exc))


def test_the_contract_catches_a_foreign_exception() -> None:
    """run_one lets anything but a TidalError through (so a finding is reported)."""
    targets.TARGETS["_probe"] = lambda data: {}["missing"]
    try:
        with pytest.raises(KeyError):
            targets.run_one("_probe", b"")
    finally:
        del targets.TARGETS["_probe"]


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "run.py"),
            name,
            "--workdir",
            str(tmp_path),
            f"-max_total_time={SHORT_RUN_S}",
            f"-seed={SEED}",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = sorted(p.name for p in (tmp_path / "regressions" / name).glob("*"))
    assert proc.returncode == 0 and not found, (found, proc.stderr[-2000:])
    assert "stat::number_of_executed_units" in proc.stderr, proc.stderr[-500:]
