"""Plot of the experiment: online p95 per second and offline CPU over time, one line per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"alone": "tab:green", "static": "tab:red", "agent": "tab:blue"}


def plot_experiment(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_cpu) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, run in result["runs"].items():
        tl = run.get("timeline") or {}
        t = tl.get("t", [])
        colour = COLOURS.get(name)
        lat = [(x, y) for x, y in zip(t, tl.get("p95_ms", []), strict=False) if y is not None]
        if lat:
            ax_lat.plot(
                *zip(*lat, strict=True), label=f"{name} (p95 {run['p95_ms']:.0f} ms)", color=colour
            )
        cpu = [
            (x, y) for x, y in zip(t, tl.get("offline_cores", []), strict=False) if y is not None
        ]
        if cpu:
            ax_cpu.plot(
                *zip(*cpu, strict=True), label=f"{name} (work {run['offline_work']})", color=colour
            )
    ax_lat.axhline(
        result["slo_ms"], color="black", linestyle="--", label=f"SLO {result['slo_ms']:g} ms"
    )
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("online p95 per second (ms)")
    ax_lat.legend(loc="upper left", fontsize=8)
    ax_cpu.set_ylabel("offline CPU (cores)")
    ax_cpu.set_xlabel("seconds since the load started (the first seconds are warm-up)")
    ax_cpu.legend(loc="upper left", fontsize=8)
    fig.suptitle("Tidal QoS: online service next to an offline batch job (real cgroups)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
