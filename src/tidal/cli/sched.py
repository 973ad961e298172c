"""`tidal sched ...` commands: thin front-ends over :mod:`tidal.sched`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tidal.cli.console import out
from tidal.errors import ConfigError
from tidal.sched.settings import load_settings
from tidal.sched.simulator import POLICIES, SimConfig, default_pools, simulate
from tidal.sched.traces import (
    DEFAULT_LOAD_SCALE,
    DemandTrace,
    default_trace_path,
    load_request_trace,
    synthetic,
)

app = typer.Typer(
    help="Hybrid scheduler: simulate policies, run the Kubernetes extender and controller.",
    no_args_is_help=True,
)


def _trace(spec: str, seed: int, days: int, services: int, load_scale: float) -> DemandTrace:
    if spec == "synthetic":
        return synthetic(seed=seed, days=days, services=services)
    path = default_trace_path() if spec == "genai" else Path(spec)
    return load_request_trace(path, load_scale=load_scale)


@app.command("simulate")
def simulate_cmd(
    trace: Annotated[
        str,
        typer.Option(help="'synthetic', 'genai' (the shared GenAI trace) or a request-level CSV"),
    ] = "synthetic",
    policy: Annotated[str, typer.Option(help=f"one of {', '.join(POLICIES)}, or all")] = "all",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    seed: Annotated[int, typer.Option(help="synthetic: random seed")] = 7,
    days: Annotated[int, typer.Option(help="synthetic: days to generate")] = 14,
    services: Annotated[int, typer.Option(help="synthetic: number of services")] = 6,
    train_days: Annotated[
        int | None, typer.Option(help="days used only as history (default from [sched])")
    ] = None,
    load_scale: Annotated[
        float, typer.Option(help="request traces: multiply busy workers by this")
    ] = DEFAULT_LOAD_SCALE,
    stock: Annotated[
        int | None, typer.Option(help="pods of the base virtual spec each pool can sell")
    ] = None,
) -> None:
    """Replay a per-minute demand trace under the four policies and compare their cost."""
    settings = load_settings()
    names = POLICIES if policy == "all" else (policy,)
    if policy != "all" and policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)} or all")
    config = SimConfig(
        price_ratio=settings.price_ratio,
        creation_latency_s=settings.creation_latency_s,
        ceiling=settings.ceiling,
        train_days=train_days if train_days is not None else settings.train_days,
        pools=default_pools(settings.price_ratio, stock),
    )
    report = simulate(_trace(trace, seed, days, services, load_scale), config, names)
    shown = {k: v for k, v in report.policies.items() if k in names}
    if as_json:
        doc = report.to_json()
        doc["policies"] = {k: v.to_json() for k, v in shown.items()}
        out.print_json(json.dumps(doc))
        return
    table = Table(
        title=f"{report.trace}: {report.evaluated_days} evaluated days "
        f"(after {report.train_days} days of history)"
    )
    for col in ("policy", "cost", "saving", "SLO min", "owned peak", "virt pod-h", "upgrades"):
        table.add_column(col, justify="right")
    for name, r in shown.items():
        table.add_row(
            name,
            f"{r.cost:,.0f}",
            f"{r.saving_vs_all_owned:.1%}",
            str(r.slo_violation_minutes),
            f"{r.owned_utilisation_peak:.0%}",
            f"{r.virtual_pod_hours:,.0f}",
            str(r.spec_upgrades),
        )
    out.print(table)
    out.print("cost in owned-capacity-hours; saving against all-owned sized for the peak")
