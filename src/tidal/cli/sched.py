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


TRACE_FORMATS = ("auto", "requests", "pods", "series")


def _load(
    spec: str,
    *,
    fmt: str,
    seed: int,
    days: int,
    services: int,
    load_scale: float,
    time_column: str | None,
    duration_column: str,
    service_column: str | None,
    value_column: str,
    label: str | None,
) -> DemandTrace:
    """A trace from the command line's words: a scenario name or a file of a known format."""
    import csv

    from tidal.sched.traces import (
        default_trace_path,
        load_pod_events,
        load_replica_series,
        load_request_trace,
        step_scenario,
        synthetic,
    )

    if spec == "synthetic":
        return synthetic(seed=seed, days=days, services=services)
    if spec == "step":
        return step_scenario(seed=seed, days=days, services=min(services, 4))
    path = default_trace_path() if spec == "genai" else Path(spec)
    if fmt not in TRACE_FORMATS:
        raise ConfigError(f"unknown trace format {fmt!r}; use {', '.join(TRACE_FORMATS)}")
    if fmt == "auto":
        if path.suffix.lower() == ".json":
            fmt = "series"
        else:
            try:
                with path.open(newline="") as fh:
                    header = next(csv.reader(fh), [])
            except OSError as exc:
                raise ConfigError(
                    f"cannot read trace {path}: {exc.strerror or exc}; pass 'synthetic', "
                    "'step', 'genai' or an existing file"
                ) from exc
            if (time_column or "create_time") in header and "cpu" in header:
                fmt = "pods"
            elif duration_column in header:
                fmt = "requests"
            else:
                fmt = "series"
    if fmt == "requests":
        split = service_column if service_column is not None else "predict_type"
        return load_request_trace(
            path,
            load_scale=load_scale,
            time_column=time_column or "gmt_create",
            duration_column=duration_column,
            split_by=split or None,
        )
    if fmt == "pods":
        cols = {"create": time_column} if time_column else {}
        if service_column:
            cols["service"] = service_column
        return load_pod_events(path, columns=cols)
    return load_replica_series(
        path,
        time_column=time_column or "time",
        service_column=service_column or "service",
        value_column=value_column,
        label=label,
    )


@app.command("simulate")
def simulate_cmd(
    trace: Annotated[
        str,
        typer.Option(
            help="'synthetic' (tide), 'step' (the write-up's scenario), 'genai' (the shared "
            "GenAI trace) or a file: request log CSV, pod event CSV, replica series CSV or "
            "Prometheus range-query JSON"
        ),
    ] = "synthetic",
    train: Annotated[
        str | None,
        typer.Option(help="fit on this trace (file or scenario); evaluate on --eval"),
    ] = None,
    eval_: Annotated[
        str | None, typer.Option("--eval", help="evaluate on this trace (with --train)")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help=f"file format: {', '.join(TRACE_FORMATS)}")
    ] = "auto",
    policy: Annotated[str, typer.Option(help=f"one of {', '.join(POLICIES)}, or all")] = "all",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    seed: Annotated[int, typer.Option(help="scenarios: random seed")] = 7,
    days: Annotated[int, typer.Option(help="scenarios: days to generate")] = 14,
    services: Annotated[int, typer.Option(help="scenarios: number of services")] = 6,
    train_days: Annotated[
        int | None, typer.Option(help="one trace: days fitted on (default from [sched])")
    ] = None,
    load_scale: Annotated[
        float, typer.Option(help="request logs: replicas per busy worker")
    ] = DEFAULT_LOAD_SCALE,
    creation_latency: Annotated[
        float | None,
        typer.Option(help="seconds from requesting a virtual pod to its serving (0: at once)"),
    ] = None,
    price_ratio: Annotated[
        float | None, typer.Option(help="virtual price per resource over owned")
    ] = None,
    smoothing: Annotated[
        int, typer.Option(help="minutes of trailing mean the policies decide on (1: raw)")
    ] = 1,
    time_column: Annotated[
        str | None, typer.Option(help="time column (request time, pod creation, sample time)")
    ] = None,
    duration_column: Annotated[
        str, typer.Option(help="request logs: service time column (seconds)")
    ] = "exec_time_seconds",
    service_column: Annotated[
        str | None, typer.Option(help="column naming the service ('' for one service)")
    ] = None,
    value_column: Annotated[str, typer.Option(help="long series CSV: value column")] = "value",
    label: Annotated[
        str | None, typer.Option(help="Prometheus JSON: label naming the service")
    ] = None,
    stock: Annotated[
        int | None, typer.Option(help="pods of the base virtual spec each pool can sell")
    ] = None,
) -> None:
    """Replay per-minute demand under every policy, fitted on other days, and compare cost."""
    from tidal.sched.simulator import SimConfig, default_pools, simulate

    settings = load_settings()
    names = POLICIES if policy == "all" else (policy,)
    if policy != "all" and policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)} or all")
    if (train is None) != (eval_ is None):
        raise ConfigError("--train and --eval go together (fit on one trace, evaluate another)")
    ratio = price_ratio if price_ratio is not None else settings.price_ratio
    config = SimConfig(
        price_ratio=ratio,
        creation_latency_s=(
            creation_latency if creation_latency is not None else settings.creation_latency_s
        ),
        ceiling=settings.ceiling,
        train_days=train_days if train_days is not None else settings.train_days,
        smoothing_minutes=smoothing,
        pools=default_pools(ratio, stock),
    )

    def load(spec: str) -> DemandTrace:
        return _load(
            spec,
            fmt=fmt,
            seed=seed,
            days=days,
            services=services,
            load_scale=load_scale,
            time_column=time_column,
            duration_column=duration_column,
            service_column=service_column,
            value_column=value_column,
            label=label,
        )

    if train is not None and eval_ is not None:
        report = simulate(load(train), config, names, eval_trace=load(eval_))
    else:
        report = simulate(load(trace), config, names)
    for warning in report.warnings:
        err.print(f"warning: {warning}")
    shown = {k: v for k, v in report.policies.items() if k in names}
    if as_json:
        doc = report.to_json()
        doc["policies"] = {k: v.to_json() for k, v in shown.items()}
        out.print_json(json.dumps(doc))
        return
    table = Table(
        title=f"{report.trace}: {report.evaluated_days} evaluated days "
        f"(fitted on {report.train_days} other days)"
    )
    for col in ("policy", "cost", "saving", "SLO min", "owned nodes", "virt pod-h", "upgrades"):
        table.add_column(col, justify="right")
    rows = list(shown.items())
    rows += [(f"[dim]{name} (bound)[/dim]", r) for name, r in report.bounds.items()]
    for name, r in rows:
        table.add_row(
            name,
            f"{r.cost:,.0f}",
            f"{r.saving_vs_all_owned:.1%}",
            str(r.slo_violation_minutes),
            str(r.owned_nodes),
            f"{r.virtual_pod_hours:,.0f}",
            str(r.spec_upgrades),
        )
    out.print(table)
    out.print(
        "cost in owned-capacity-hours (one 2c4g replica-hour on owned nodes); saving against "
        "all-owned sized for the peak of the total; SLO minutes on raw per-minute demand; the "
        "oracle pays the creation latency like every policy, oracle-instant does not"
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
