"""``tidal instance ...``: one-command container instances (pods) on the engine daemon.

Thin client of the instance API the daemon serves (:class:`tidal.instance.client.InstanceClient`);
errors arrive as Tidal errors and ``tidal.cli.main`` prints them as one line.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer

from tidal.cli.console import command_argv, err, out, stdin_bytes, write_exec_result
from tidal.engine.settings import load_settings
from tidal.engine.spec import parse_env, parse_labels, parse_port, parse_volume
from tidal.units import format_size, parse_cpus, parse_size

if TYPE_CHECKING:
    from tidal.instance.client import InstanceClient

app = typer.Typer(
    help=(
        "Elastic container instances: a pod (one sandbox holding the network, IPC and UTS "
        "namespaces, plus its containers) under one cgroup with pod-level limits, from one "
        "command. Served by 'tidal daemon'."
    ),
    no_args_is_help=True,
)


def _client() -> InstanceClient:
    from tidal.instance.client import InstanceClient

    return InstanceClient(load_settings().resolved_socket_path())


_argv = command_argv


def _opt(text: str | None, parse: Any, *args: Any) -> Any:
    return None if text is None else parse(text, *args)


@app.command()  # options may follow IMAGE; the command is only what comes after --
def run(
    image: str = typer.Argument(
        ..., help="main container's image: a registry reference, Tidal image or rootfs dir"
    ),
    command: list[str] = typer.Argument(None, help="main container's command (after --)"),
    name: str | None = typer.Option(None, "--name", help="instance name (default i-<id8>)"),
    container: list[str] = typer.Option(
        [],
        "--container",
        "-c",
        help="another container of the pod: NAME[:RESTART]=IMAGE[:COMMAND] (RESTART: no, "
        "on-failure, always; a one-word COMMAND: its absolute path)",
    ),
    spec: str | None = typer.Option(
        None,
        "--spec",
        help="instance types in fallback order, e.g. 2c2g,2c4g,4c8g: the first the node's "
        "free capacity holds is taken",
    ),
    cpus: str | None = typer.Option(None, "--cpus", help="pod CPU limit (over the type's)"),
    memory: str | None = typer.Option(None, "--memory", "-m", help="pod memory, e.g. 512M"),
    pids: int | None = typer.Option(None, "--pids-limit", help="pod pids limit"),
    bandwidth: str | None = typer.Option(
        None, "--bandwidth", help="both directions, bits/s: 5M = 5 Mbit/s"
    ),
    egress: str | None = typer.Option(None, "--egress", help="out of the instance, bits/s"),
    ingress: str | None = typer.Option(None, "--ingress", help="into the instance, bits/s"),
    pps: str | None = typer.Option(
        None, "--pps", help="packets/s, both ways (where the kernel allows)"
    ),
    disk_read: str | None = typer.Option(None, "--disk-read", help="bytes/s, e.g. 50M"),
    disk_write: str | None = typer.Option(None, "--disk-write", help="bytes/s, e.g. 50M"),
    disk_read_iops: int | None = typer.Option(None, "--disk-read-iops"),
    disk_write_iops: int | None = typer.Option(None, "--disk-write-iops"),
    runtime: str | None = typer.Option(None, "--runtime", help="runc (default) | runsc (gVisor)"),
    publish: list[str] = typer.Option([], "--publish", "-p", help="HOST:CONTAINER"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, for every container"),
    volume: list[str] = typer.Option(
        [], "--volume", "-v", help="main container: /dst or /src:/dst[:ro]"
    ),
    label: list[str] = typer.Option([], "--label", "-l", help="KEY=VALUE"),
    restart: str = typer.Option("no", "--restart", help="main container: no|on-failure|always"),
    rm: bool = typer.Option(False, "--rm", help="remove the instance once main has exited"),
    pull: str | None = typer.Option(None, "--pull", help="missing | always | never"),
    as_json: bool = typer.Option(False, "--json"),
    replicas: int | None = typer.Option(
        None,
        "--replicas",
        min=1,
        help="start N instances of this spec from this one process (batches over one "
        "connection), named NAME-0..NAME-(N-1); progress on stderr",
    ),
) -> None:
    """Create and start an instance; prints its name and IP (with --replicas: one line each)."""
    from tidal.instance.spec import (  # here: every other command's start-up skips it
        InstanceSpec,
        Limits,
        parse_bytes_rate,
        parse_count,
        parse_member,
        parse_rate,
        parse_spec_list,
    )

    limits = Limits(
        cpus=_opt(cpus, parse_cpus),
        memory_bytes=_opt(memory, parse_size),
        pids=pids,
        egress_bps=_opt(egress or bandwidth, parse_rate, "--egress" if egress else "--bandwidth"),
        ingress_bps=_opt(
            ingress or bandwidth, parse_rate, "--ingress" if ingress else "--bandwidth"
        ),
        egress_pps=_opt(pps, parse_count, "--pps"),
        ingress_pps=_opt(pps, parse_count, "--pps"),
        disk_read_bps=_opt(disk_read, parse_bytes_rate, "--disk-read"),
        disk_write_bps=_opt(disk_write, parse_bytes_rate, "--disk-write"),
        disk_read_iops=disk_read_iops,
        disk_write_iops=disk_write_iops,
    )
    ispec = InstanceSpec(
        image=image,
        command=_argv(command),
        name=name,
        members=tuple(parse_member(c) for c in container),
        specs=parse_spec_list(spec),
        limits=limits,
        runtime=runtime,
        ports=tuple(parse_port(p) for p in publish),
        env=parse_env(env),
        volumes=tuple(parse_volume(v) for v in volume),
        labels=parse_labels(label),
        restart=restart,
        remove_on_exit=rm,
        pull=pull,
    )
    if replicas is not None:
        _run_replicas(ispec, replicas, as_json)
        return
    with _client() as client:
        data = client.run_instance(ispec)
    if as_json:
        out.print_json(json.dumps(data))
        return
    sys.stdout.write(f"{data['name']} {data.get('ip') or '-'}\n")
    for note in data.get("unenforced") or ():
        err.print(f"warning: not enforced on this node: {note}", markup=False)


REPLICA_BATCH = 25
"""Instances per batch request of ``--replicas``: large enough that requests cost nothing
beside the instances, small enough that progress shows every few seconds."""


def _run_replicas(ispec: Any, count: int, as_json: bool) -> None:
    """``--replicas N``: N copies of ``ispec`` through the batch API, one line per instance on
    stdout, progress and each failure on stderr; exit status 1 if any failed."""
    import dataclasses

    from tidal.errors import ConfigError, TidalError

    if count > 1 and ispec.ports:
        raise ConfigError(
            f"--replicas {count} with -p would publish the same host port {count} times; "
            "drop -p or use --replicas 1"
        )
    specs = [
        dataclasses.replace(ispec, name=f"{ispec.name}-{i}" if ispec.name else None)
        for i in range(count)
    ]
    failed = done = 0
    rows: list[dict[str, Any]] = []
    with _client() as client:
        for first in range(0, count, REPLICA_BATCH):
            chunk = specs[first : first + REPLICA_BATCH]
            results = client.run_instances(chunk)
            for i, (spec, res) in enumerate(zip(chunk, results, strict=True), first):
                done += 1
                label = spec.name or f"#{i}"
                if isinstance(res, TidalError):
                    failed += 1
                    err.print(f"error: instance {label}: {res}", markup=False)
                    rows.append({"name": spec.name, "error": str(res)})
                    continue
                rows.append(res)
                if not as_json:
                    sys.stdout.write(f"{res['name']} {res.get('ip') or '-'}\n")
                    sys.stdout.flush()
            err.print(f"{done}/{count} done, {failed} failed", markup=False)
    if as_json:
        out.print_json(json.dumps(rows))
    if failed:
        raise typer.Exit(1)


def _spec_text(d: dict[str, Any]) -> str:
    chosen = d.get("chosen")
    return chosen["name"] if chosen else "ad-hoc"


@app.command("ls")
def ls(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="names only"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List instances: name, status, spec, limits, IP, containers."""
    with _client() as client:
        items = client.instances()
    if quiet:
        sys.stdout.write("".join(f"{d['name']}\n" for d in items))
        return
    if as_json:
        out.print_json(json.dumps(items))
        return
    lines = [
        f"{'NAME':<20}  {'STATUS':<9}  {'SPEC':<8}  {'CPUS':>5}  {'MEMORY':>9}  {'IP':<14}  CONTAINERS"
    ]
    for d in items:
        lim = d.get("limits") or {}
        mem = lim.get("memory_bytes")
        lines.append(
            f"{d['name'][:20]:<20}  {d['status']:<9}  {_spec_text(d):<8}  "
            f"{lim.get('cpus') or '-'!s:>5}  {format_size(mem) if mem else '-':>9}  "
            f"{(d.get('ip') or '-'):<14}  "
            + ",".join(f"{c['member']}:{c['status']}" for c in d.get("containers") or [])
        )
    sys.stdout.write("\n".join(lines) + "\n")


@app.command()
def inspect(instance: str) -> None:
    """Everything the node knows about an instance, as JSON (chosen spec, limits, containers)."""
    with _client() as client:
        out.print_json(json.dumps(client.instance(instance)))


@app.command()
def logs(
    instance: str,
    container: str | None = typer.Option(None, "--container", "-c", help="default: main"),
    follow: bool = typer.Option(False, "--follow", "-f"),
) -> None:
    """Print a container's output (the main container unless -c names another)."""
    with _client() as client:
        if follow:
            for data in client.follow_instance_logs(instance, container):
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            return
        offset = 0
        while True:
            data, offset, _ = client.instance_logs(instance, container, offset)
            if not data:
                break
            sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@app.command("exec")  # options may follow NAME; the command is only what comes after --
def exec_(
    instance: str,
    command: list[str] = typer.Argument(..., help="command (after --)"),
    container: str | None = typer.Option(None, "--container", "-c", help="default: main"),
    env: list[str] = typer.Option([], "--env", "-e"),
) -> None:
    """Run a command in one of the instance's containers; exits with its status."""
    with _client() as client:
        res = client.instance_exec(
            instance, list(_argv(command)), container=container, env=env, stdin=stdin_bytes()
        )
    raise typer.Exit(write_exec_result(res))


@app.command()
def stop(
    instances: list[str],
    timeout: float | None = typer.Option(None, "--timeout", "-t", help="seconds to SIGKILL"),
) -> None:
    """Stop instances (their containers, then the sandbox); they keep their records."""
    with _client() as client:
        for ref in instances:
            d = client.stop_instance(ref, timeout)
            out.print(f"{d['name']}: {d['status']}", markup=False)


@app.command()
def rm(
    instances: list[str],
    force: bool = typer.Option(False, "--force", "-f", help="stop running ones first"),
) -> None:
    """Remove instances and everything they hold (containers, netns, tc, cgroup)."""
    from tidal.errors import TidalError

    failed = False
    with _client() as client:
        for ref in instances:
            try:
                client.remove_instance(ref, force=force)
            except TidalError as exc:  # go on with the others, as docker rm does
                err.print(f"error: {exc}", markup=False)
                failed = True
                continue
            out.print(ref, markup=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def capacity() -> None:
    """The node's capacity for instances, what they reserve, and the known instance types."""
    with _client() as client:
        out.print_json(json.dumps(client.capacity()))
