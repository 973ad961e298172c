"""Run one coverage-guided fuzz target (atheris over libFuzzer), or replay the saved inputs.

Usage::

    .venv/bin/python fuzz/run.py TARGET [libFuzzer flags]      # e.g. -max_total_time=600
    .venv/bin/python fuzz/run.py TARGET --replay               # seeds + regressions, no fuzzing
    .venv/bin/python fuzz/run.py TARGET --workdir DIR -runs=N  # corpus and findings under DIR
    .venv/bin/python fuzz/run.py --list

The corpus starts from :func:`targets.seeds` (written to ``fuzz/corpus/TARGET/`` on first
run; not committed, it grows as libFuzzer finds new paths). A finding -- anything but a
TidalError escaping -- stops the run; libFuzzer writes the input as ``crash-<sha1>`` into
``fuzz/regressions/TARGET/``, which is committed once the bug is fixed, and ``--replay`` (run by
``make test`` through tests/fuzz) keeps it fixed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import targets  # noqa: E402


def corpus_dir(name: str, base: Path = HERE) -> Path:
    d = base / "corpus" / name
    d.mkdir(parents=True, exist_ok=True)
    for seed in targets.seeds(name):
        (d / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return d


def regressions_dir(name: str, base: Path = HERE) -> Path:
    d = base / "regressions" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def replay(name: str) -> int:
    inputs = [
        *targets.seeds(name),
        *(p.read_bytes() for p in sorted(regressions_dir(name).iterdir())),
    ]
    for data in inputs:
        targets.run_one(name, data)
    print(f"{name}: {len(inputs)} inputs replayed, only TidalError raised")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        print("\n".join(targets.TARGETS))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in targets.TARGETS:
        print(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}", file=sys.stderr)
        return 2
    if "--replay" in rest:
        return replay(name)
    base = HERE
    if "--workdir" in rest:
        i = rest.index("--workdir")
        base = Path(rest[i + 1])
        rest = rest[:i] + rest[i + 2 :]
    import atheris

    with atheris.instrument_imports(include=["tidal"]):
        import tidal.blobs.auth
        import tidal.blobs.reference
        import tidal.blockdev.oci_archive
        import tidal.image.extents
        import tidal.image.manifest
        import tidal.image.oci
        import tidal.image.trace
        import tidal.image.zfile
        import tidal.qos.rules  # noqa: F401

    def one(data: bytes) -> None:
        targets.run_one(name, data)

    flags = [
        sys.argv[0],
        f"-artifact_prefix={regressions_dir(name, base)}/",
        "-max_len=65536",
        "-timeout=10",
        "-rss_limit_mb=2048",
        *rest,
        str(corpus_dir(name, base)),
    ]
    atheris.Setup(flags, one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
