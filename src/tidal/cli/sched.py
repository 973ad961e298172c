"""`tidal sched ...` commands: thin front-ends over :mod:`tidal.sched`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tidal.cli.console import err, out
from tidal.errors import ConfigError
from tidal.sched.settings import DEFAULT_LOAD_SCALE, POLICIES, load_settings

if TYPE_CHECKING:  # the commands import numpy, kubernetes and the simulator when they run
    from tidal.sched.extender import ExtenderView
    from tidal.sched.traces import DemandTrace

app = typer.Typer(
    help="Hybrid scheduler: simulate policies, run the Kubernetes extender and controller.",
    no_args_is_help=True,
)


def _trace(spec: str, seed: int, days: int, services: int, load_scale: float) -> DemandTrace:
    from tidal.sched.traces import default_trace_path, load_request_trace, synthetic

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
    from tidal.sched.simulator import SimConfig, default_pools, simulate

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
    for name, r in report.bounds.items():
        table.add_row(
            f"[dim]{name} (bound)[/dim]",
            f"{r.cost:,.0f}",
            f"{r.saving_vs_all_owned:.1%}",
            str(r.slo_violation_minutes),
            f"{r.owned_utilisation_peak:.0%}",
            f"{r.virtual_pod_hours:,.0f}",
            str(r.spec_upgrades),
        )
    out.print(table)
    out.print(
        "cost in owned-capacity-hours; saving against all-owned sized for the peak; the oracle "
        "pays the creation latency like every policy, oracle-instant does not (unreachable)"
    )


def _static_view(thresholds: Path | None) -> ExtenderView:
    from tidal.sched.extender import ExtenderView

    if thresholds is None:
        return ExtenderView()
    import yaml

    try:
        doc = yaml.safe_load(thresholds.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read thresholds file {thresholds}: {exc}") from exc
    if not isinstance(doc, dict) or not all(isinstance(v, int) for v in doc.values()):
        raise ConfigError(f"thresholds file {thresholds} must map service names to integers")
    return ExtenderView(thresholds={str(k): int(v) for k, v in doc.items()})


KubeconfigOpt = Annotated[
    Path | None,
    typer.Option(help="kubeconfig file (default: in-cluster service account, else ~/.kube/config)"),
]


@app.command("extender")
def extender_cmd(
    host: Annotated[str | None, typer.Option(help="listen address (default from [sched])")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default from [sched])")] = None,
    kubeconfig: KubeconfigOpt = None,
    watch: Annotated[
        bool, typer.Option(help="run the controller in-process to keep the view current")
    ] = False,
    thresholds: Annotated[
        Path | None, typer.Option(help="YAML {service: threshold} used without --watch")
    ] = None,
) -> None:
    """Serve kube-scheduler's extender API (POST /filter, /prioritize, /preempt) until interrupted."""
    from tidal.sched.controller import Controller, KubernetesApi
    from tidal.sched.extender import ExtenderServer, ViewStore

    settings = load_settings()
    store = ViewStore(_static_view(thresholds))
    server = ExtenderServer(
        store, host or settings.extender_host, port if port is not None else settings.extender_port
    )
    stop = threading.Event()
    worker = None
    if watch:
        api = KubernetesApi.from_kubeconfig(kubeconfig)
        server.binder = api  # with --watch the extender can also bind (bindVerb: bind)
        ctl = Controller(
            api,
            settings=settings,
            store=store,
            history_dir=settings.resolved_state_dir() / "history",
        )
        # /healthz fails (503) when the controller loop dies or its view goes stale
        store.health_source = ctl.health_problem
        worker = threading.Thread(
            target=ctl.run, args=(stop,), name="tidal-controller", daemon=True
        )
        worker.start()
    verbs = "filter, prioritize, preempt" + (", bind" if server.binder is not None else "")
    err.print(f"tidal extender listening on {server.url} ({verbs})")
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
        if worker is not None:
            worker.join(timeout=5)


@app.command("controller")
def controller_cmd(
    kubeconfig: KubeconfigOpt = None,
    namespace: Annotated[str | None, typer.Option(help="only this namespace")] = None,
    once: Annotated[bool, typer.Option(help="reconcile once, print what changed, exit")] = False,
) -> None:
    """Keep pod-deletion-cost annotations and owned-node thresholds of Tidal Deployments current."""
    from tidal.sched.controller import Controller, KubernetesApi

    settings = load_settings()
    ctl = Controller(
        KubernetesApi.from_kubeconfig(kubeconfig),
        namespace=namespace,
        settings=settings,
        history_dir=settings.resolved_state_dir() / "history",
    )
    if once:
        report, _ = ctl.reconcile_all()
        plural = "" if report.deployments == 1 else "s"
        out.print(
            f"{report.deployments} deployment{plural}, {report.pods_patched} pod(s) and "
            f"{report.deployments_patched} deployment(s) patched"
        )
        for svc, t in sorted(report.thresholds.items()):
            out.print(
                f"  {svc}: threshold {t if t is not None else 'none yet (needs a day of history)'}"
            )
        return
    stop = threading.Event()
    try:
        ctl.run(stop)
    except KeyboardInterrupt:
        stop.set()


@app.command("cordon")
def cordon_cmd(
    site: Annotated[str, typer.Option(help="site (region label) or virtual node name")],
    kubeconfig: KubeconfigOpt = None,
    undo: Annotated[bool, typer.Option("--undo", help="uncordon instead")] = False,
) -> None:
    """Cordon every virtual node of a site in one call (a cloud fault); --undo reverses it."""
    from tidal.sched.controller import KubernetesApi, cordon_site

    names = cordon_site(KubernetesApi.from_kubeconfig(kubeconfig), site, on=not undo)
    out.print(f"{'uncordoned' if undo else 'cordoned'}: {', '.join(names)}")
