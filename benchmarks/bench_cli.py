"""CLI start-up: wall time of ``tidal ps`` and ``tidal --help`` beside the interpreter's floor.

Every ``tidal`` command is a fresh Python process, so what it imports before doing anything is
paid on each call (a script that starts 100 containers pays it 100 times). Rows, interleaved
round-robin in one run:
  * ``python -c pass`` (the interpreter alone) and ``python -c "import typer, httpx, rich"``
    (what any Typer CLI talking HTTP must load: the practical floor);
  * ``tidal --help``;
  * ``tidal ps`` against a running engine daemon (its own state directory, no containers).

Usage: .venv/bin/python benchmarks/bench_cli.py [--runs 30]
Writes benchmarks/results/cli.json. ``tidal ps`` needs root (the daemon); without it that row
is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "cli.json"
PY = sys.executable
TIDAL = [PY, "-m", "tidal.cli.main"]


def _time(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode()[-300:]}")
    return elapsed


def _start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        proc = subprocess.Popen([*TIDAL, "daemon"], env=env, stdout=fh, stderr=fh)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run([*TIDAL, "ps"], env=env, capture_output=True).returncode == 0:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the engine daemon did not come up: {log.read_text()[-500:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tidal-bench-cli-") as tmp:
        env = {**os.environ, "TIDAL_DATA_ROOT": tmp, "TIDAL_ENGINE__LXCFS": "off"}
        cases: dict[str, list[str]] = {
            "python -c pass (interpreter)": [PY, "-c", "pass"],
            "python: import typer, httpx, rich (floor)": [
                PY,
                "-c",
                "import typer, httpx, rich.console",
            ],
            "tidal --help": [*TIDAL, "--help"],
        }
        daemon = None
        skipped = None
        if os.geteuid() == 0:
            daemon = _start_daemon(env, Path(tmp) / "daemon.log")
            cases["tidal ps (daemon running)"] = [*TIDAL, "ps"]
        else:
            skipped = "tidal ps: needs root to run the engine daemon"
        samples: dict[str, list[float]] = {k: [] for k in cases}
        try:
            for _ in range(args.runs):
                for name, argv in cases.items():
                    samples[name].append(_time(argv, env))
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(timeout=30)
    floor = statistics.median(samples["python: import typer, httpx, rich (floor)"])
    rows = [
        {
            "command": name,
            "runs": len(s),
            "p50_ms": statistics.median(s) * 1000,
            "p90_ms": statistics.quantiles(s, n=10)[-1] * 1000,
            "vs_floor_p50": statistics.median(s) / floor,
        }
        for name, s in samples.items()
    ]
    print(f"{'command':45} {'p50 ms':>8} {'p90 ms':>8} {'x floor':>8}")
    for r in rows:
        print(f"{r['command']:45} {r['p50_ms']:8.0f} {r['p90_ms']:8.0f} {r['vs_floor_p50']:8.2f}")
    if skipped:
        print(f"skipped: {skipped}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "cli_startup", "rows": rows, "skipped": skipped}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
