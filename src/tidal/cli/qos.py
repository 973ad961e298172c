"""`tidal qos ...` commands: the node QoS agent, its API client side, and the experiment."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tidal.cli.console import err
from tidal.errors import QosError

if TYPE_CHECKING:
    from tidal.qos.client import QosClient

app = typer.Typer(
    help="Node QoS agent: keep online services inside their SLO next to offline work.",
    no_args_is_help=True,
)
rules_app = typer.Typer(help="Validate rules files and print an example.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

EXAMPLE_RULES = """\
version: 1
containers:                  # the cgroups this agent watches (paths below the hierarchy root)
  - cgroup: shop/web
    labels: {app: web, priority: online}
    spec: {cpus: 1.0}        # declared quota; drift from it is escalated
  - cgroup: batch/etl
    labels: {app: etl, priority: offline}
  - engine: {priority: offline}   # Tidal engine containers labelled so (tidal run --label ...),
                                  # found through the engine daemon's API (socket: [qos]
                                  # engine_socket, or `engine: {socket: PATH}` here)
classes:                     # label selectors for the two priorities
  online: {priority: online}
  offline: {priority: offline}
slo: {app: web, p95_latency_ms: 250}
policy: {type: slo_feedback, tighten_at: 0.7, loosen_below: 0.4, step_cores: 0.25, floor_cores: 0.2}
rules:
  - {type: cpu_spike, threshold: 0.9}
  - {type: memory_guard}
guards: {drift_limit_s: 600, scale_out_after_s: 30}
"""


def _default_results_dir() -> Path:
    """``benchmarks/results`` of the source tree when run from a checkout, else the CWD's."""
    import tidal

    repo = Path(tidal.__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def _api(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    from tidal.qos.settings import load_qos_settings

    s = load_qos_settings()
    return f"http://{s.api_host}:{s.api_port}"


def _client(url: str | None) -> QosClient:
    from tidal.qos.client import QosClient

    return QosClient(_api(url))


@app.command()
def agent(
    rules: Path | None = typer.Option(None, help="Rules YAML (default: [qos] rules_file)."),
    port: int | None = typer.Option(None, help="API port on the configured host."),
    recover: str = typer.Option(
        "restore", help="What to do with a previous agent's journal: restore or adopt."
    ),
    handover: bool = typer.Option(
        False, help="On exit, leave adjustments for the next agent to adopt."
    ),
) -> None:
    """Run the agent in the foreground until SIGINT/SIGTERM; restores every cgroup on exit."""
    import dataclasses

    from tidal.qos.agent import Agent
    from tidal.qos.settings import load_qos_settings

    if recover not in ("restore", "adopt"):
        raise QosError(f"--recover must be restore or adopt, not {recover!r}")
    settings = load_qos_settings()
    if rules is not None:
        settings = dataclasses.replace(settings, rules_file=rules)
    if port is not None:
        settings = dataclasses.replace(settings, api_port=port)
    a = Agent(settings)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    a.start(recover=recover)
    host, aport = a.api_address or ("-", 0)
    err.print(
        f"qos agent: cgroup v{a.fs.version}, rules {settings.resolved_rules_file()}, API http://{host}:{aport}"
    )
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        problems = a.stop(handover=handover)
    if problems:
        raise QosError("agent stopped but could not restore: " + "; ".join(problems))


@app.command()
def status(url: str | None = typer.Option(None, help="Agent API base URL.")) -> None:
    """Print the running agent's status as JSON."""
    with _client(url) as c:
        typer.echo(json.dumps(c.status(), indent=2))


@app.command("dry-run")
def dry_run(url: str | None = typer.Option(None, help="Agent API base URL.")) -> None:
    """Show what the agent would change now, without changing it."""
    with _client(url) as c:
        typer.echo(json.dumps(c.dry_run(), indent=2))


@app.command()
def events(url: str | None = typer.Option(None, help="Agent API base URL.")) -> None:
    """Escalations, scale-out requests, rollbacks and rule reloads, oldest first."""
    with _client(url) as c:
        typer.echo(json.dumps(c.events(), indent=2))


@app.command()
def restore() -> None:
    """Put back every cgroup a (dead) agent changed, from its journal."""
    from tidal.cgroups import detect_cgroupfs
    from tidal.qos.settings import load_qos_settings
    from tidal.qos.watchdog import restore_from_journal

    s = load_qos_settings()
    problems = restore_from_journal(s.resolved_state_dir(), detect_cgroupfs(s.cgroup_root))
    if problems:
        raise QosError("could not restore: " + "; ".join(problems))
    err.print("qos: journal restored (or nothing to restore)")


@rules_app.command("check")
def rules_check(path: Path) -> None:
    """Validate a rules file; prints the policy and rules it defines."""
    from tidal.qos.rules import load_rules

    rs = load_rules(path)
    names = [r.name for r in rs.all_rules()]
    slo = {k: v for k, v in vars(rs.slo).items() if v is not None}
    typer.echo(f"{path}: ok — {len(rs.containers)} container entries, rules {names}, SLO {slo}")


@rules_app.command("example")
def rules_example() -> None:
    """Print an example rules file."""
    typer.echo(EXAMPLE_RULES, nl=False)


@app.command()
def experiment(
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    duration: float = typer.Option(120.0, help="Measured seconds per run (three runs)."),
    rate: float = typer.Option(55.0, help="Online requests per second (open loop)."),
    work_ms: float = typer.Option(15.0, help="CPU milliseconds per online request."),
    workers: int = typer.Option(6, help="Offline batch processes."),
    policy: str = typer.Option("slo_feedback", help="Policy of the agent run."),
    output: Path | None = typer.Option(
        None, help="Result JSON (default benchmarks/results/qos-experiment.json)."
    ),
    plot: Path | None = typer.Option(None, help="Plot PNG (default next to the JSON)."),
) -> None:
    """Co-locate an online service and an offline batch job on real cgroups: alone, static, agent."""
    from tidal.extras import require_extra

    # its plot needs matplotlib: say so before minutes of runs, not after
    require_extra("bench", "tidal qos experiment", ("matplotlib",))
    from tidal.qos.experiment.plot import plot_experiment
    from tidal.qos.experiment.runner import ExperimentConfig, run_experiment, verdict

    if duration < 10:
        raise QosError(
            f"--duration {duration:g} is shorter than one 10 s SLO window; use at least 10"
        )
    cfg = ExperimentConfig(
        duration_s=duration, rate_rps=rate, work_ms=work_ms, offline_workers=workers, policy=policy
    )
    result = run_experiment(cfg, progress=lambda s: err.print(s))
    out = output or _default_results_dir() / "qos-experiment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = plot or out.with_suffix(".png")
    plot_experiment(result, png)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for name, r in result["runs"].items():
            typer.echo(
                f"{name:7s} p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"SLO windows {r['slo_window_attainment']:.0%}  offline work {r['offline_work']}"
            )
        v = verdict(result)
        if v:
            typer.echo(
                f"target (>=95% windows, >=60% of static offline work): "
                f"{'MET' if v['met'] else 'NOT MET'} — attainment {v['agent_slo_window_attainment']:.0%}, "
                f"offline {v['agent_offline_vs_static']:.0%} of static"
            )
    err.print(f"wrote {out} and {png}")
