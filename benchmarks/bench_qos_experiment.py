"""The co-location experiment as a benchmark: Tidal's agent beside static limits and alone.

Runs ``tidal qos experiment`` (three runs on real cgroups: online alone, co-located with
Kubernetes-style static limits, co-located with the agent's SLO feedback policy) and, as a
second baseline, the agent with the utilisation-budget policy that open-source co-location
agents use. Prints one table; writes ``benchmarks/results/qos-experiment.json`` (the issue's
shape), ``qos-experiment.png`` and ``qos-experiment-budget.json``. Needs root.

    .venv/bin/python benchmarks/bench_qos_experiment.py [--duration 120] [--no-budget]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from tidal.qos.experiment.plot import plot_experiment
from tidal.qos.experiment.runner import ExperimentConfig, run_experiment, run_one, verdict

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds per run")
    parser.add_argument("--no-budget", action="store_true", help="skip the utilisation-budget run")
    args = parser.parse_args()
    cfg = ExperimentConfig(duration_s=args.duration)
    progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = run_experiment(cfg, progress)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qos-experiment.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_experiment(result, RESULTS / "qos-experiment.png")
    rows = dict(result["runs"])
    if not args.no_budget:
        bcfg = dataclasses.replace(cfg, policy="utilisation_budget", runs=("agent_budget",))
        with tempfile.TemporaryDirectory(prefix="tidal-qos-bench-") as tmp:
            budget = run_one("agent_budget", bcfg, Path(tmp), progress)
        (RESULTS / "qos-experiment-budget.json").write_text(
            json.dumps({"slo_ms": cfg.slo_ms, "runs": {"agent_budget": budget}}, indent=1) + "\n"
        )
        rows["agent_budget"] = budget
    static_work = rows["static"]["offline_work"] or 1
    print(
        f"\nco-location on {cfg.rate_rps:g} rps x {cfg.work_ms:g} ms online + "
        f"{cfg.offline_workers} offline workers, {cfg.duration_s:g}s per run, SLO p95 < {cfg.slo_ms:g} ms"
    )
    print(
        f"{'run':14s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'SLO windows':>12s} "
        f"{'offline work':>13s} {'vs static':>10s}"
    )
    labels = {
        "alone": "alone",
        "static": "static (k8s)",
        "agent": "Tidal agent",
        "agent_budget": "budget agent",
    }
    for name, r in rows.items():
        print(
            f"{labels.get(name, name):14s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['slo_window_attainment']:12.0%} {r['offline_work']:13d} "
            f"{r['offline_work'] / static_work:10.0%}"
        )
    v = verdict(result)
    print(
        f"\ntarget: agent p95 inside SLO in >= 95% of windows and >= 60% of static offline work: "
        f"{'MET' if v['met'] else 'NOT MET'} ({v['agent_slo_window_attainment']:.0%} of windows, "
        f"{v['agent_offline_vs_static']:.0%} of static work)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
