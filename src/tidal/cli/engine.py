"""Container engine commands (``tidal run``, ``ps``, ``daemon`` ...), registered at top level.

Every command except ``daemon`` is a thin client of the daemon's unix-socket API
(:class:`tidal.engine.client.EngineClient`); errors arrive as Tidal errors and are printed as
one line by ``tidal.cli.main``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from tidal.cli.console import command_argv, err, out, stdin_bytes, write_exec_result
from tidal.engine.settings import load_settings
from tidal.engine.spec import (
    ContainerSpec,
    parse_cpus_opt,
    parse_disk_quota,
    parse_env,
    parse_hook,
    parse_labels,
    parse_memory,
    parse_port,
    parse_service,
    parse_volume,
)

if TYPE_CHECKING:  # the client and the record types load with the first command, not --help
    from tidal.engine.client import EngineClient
    from tidal.engine.store import ContainerRecord


_argv = command_argv


def _image_arg(image: str) -> str:
    """A directory the user names relative to their cwd, made absolute for the daemon (whose
    cwd differs); anything else is a registry reference, resolved by the daemon."""
    path = Path(image).expanduser()
    return str(path.resolve()) if path.exists() else image


def _client() -> EngineClient:
    from tidal.engine.client import EngineClient

    return EngineClient(load_settings().resolved_socket_path())


def _status_text(rec: ContainerRecord) -> str:
    if rec.status == "running":
        return "running"
    if rec.status == "exited":
        if rec.exit_code is None:
            return "exited (unknown status)"
        extra = []
        if rec.signal:
            try:
                extra.append(signal.Signals(rec.signal).name)
            except ValueError:
                extra.append(f"signal {rec.signal}")
        if rec.oom_killed:
            extra.append("OOM-killed")
        return f"exited ({rec.exit_code}{', ' + ', '.join(extra) if extra else ''})"
    return rec.status


def _services_note(described: dict[str, object]) -> str:
    """``ps``'s word on rich-mode services that gave up (their restart limit used up)."""
    services = described.get("services")
    if not isinstance(services, list):
        return ""
    notes = [
        f"service {s['name']} gave up after {s['restarts']} restarts, last exit {s['last_exit']}"
        for s in services
        if isinstance(s, dict) and s.get("state") == "gave-up"
    ]
    return f" ({'; '.join(notes)})" if notes else ""


def _attached(
    client: EngineClient,
    rec: ContainerRecord,
    *,
    interactive: bool,
    tty: bool,
    socket_path: str | None = None,
    log_tail: int | None = None,
) -> None:
    """Show the container's output until it exits; with -i/-t through its attach socket
    (``socket_path``, else asked of the daemon). ``log_tail``: without a terminal, the log
    is followed from its last N lines (None: from its start)."""
    sock = None
    offset = 0
    if log_tail is not None and not tty:  # where "from now on" starts, before any input
        data, offset, _ = client.logs(rec.id, tail=log_tail)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    if interactive or tty:
        from tidal.engine import attach

        path = socket_path or client.inspect(rec.id).get("attach_socket")
        with contextlib.suppress(OSError):  # gone already: it exited; its output is logged
            sock = attach.connect(str(path)) if path else None
    if sock is not None and tty:
        from tidal.cli.terminal import relay_terminal

        with sock:
            relay_terminal(sock, sys.stdin.fileno(), sys.stdout.fileno(), forward_input=interactive)
        return
    if sock is not None:
        from tidal.cli.terminal import forward_stdin

        forward_stdin(sock, sys.stdin.buffer)
    try:
        for data in client.follow_logs(rec.id, offset=offset):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    finally:
        if sock is not None:
            sock.close()


def _exit_with(rec: ContainerRecord) -> NoReturn:
    if rec.exit_code is None:
        err.print(f"container {rec.name}: {rec.error or 'exit status unknown'}", markup=False)
        raise typer.Exit(125)
    raise typer.Exit(rec.exit_code)


def register(app: typer.Typer) -> None:
    """Add the engine's top-level commands to the main app."""

    @app.command(context_settings={"allow_interspersed_args": False})
    def run(
        image: str = typer.Argument(
            ..., help="registry reference (HOST:PORT/NAME:TAG), Tidal image dir or rootfs dir"
        ),
        command: list[str] = typer.Argument(None, help="command (after --)"),
        name: str | None = typer.Option(None, "--name"),
        cpus: str | None = typer.Option(None, "--cpus", help="CPU limit, e.g. 0.5 or 500m"),
        memory: str | None = typer.Option(None, "--memory", "-m", help="e.g. 512M"),
        pids_limit: int | None = typer.Option(None, "--pids-limit"),
        env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE"),
        label: list[str] = typer.Option(
            [], "--label", "-l", help="KEY=VALUE, e.g. priority=online for the QoS agent"
        ),
        volume: list[str] = typer.Option([], "--volume", "-v", help="/dst or /src:/dst[:ro]"),
        disk_quota: list[str] = typer.Option(
            [], "--disk-quota", help="SIZE[,inodes=N] | /vol=SIZE | .*=SIZE"
        ),
        network: str = typer.Option("none", "--network", help="none | host | bridge"),
        publish: list[str] = typer.Option([], "--publish", "-p", help="HOST:CONTAINER"),
        runtime: str | None = typer.Option(
            None, "--runtime", help="runc | crun | runsc (gVisor sandbox); default [engine] runtime"
        ),
        lxcfs: bool | None = typer.Option(None, "--lxcfs/--no-lxcfs"),
        rich: bool = typer.Option(False, "--rich", help="Tidal's init as PID 1"),
        rich_mode: str = typer.Option("init", "--rich-mode", help="init | systemd"),
        service: list[str] = typer.Option(
            [], "--service", help="NAME[:POLICY[:MAX]]=COMMAND (shell quoting)"
        ),
        initscript: str | None = typer.Option(None, "--initscript"),
        restart: str = typer.Option("no", "--restart", help="rich mode: no|on-failure|always"),
        hook_prestart: list[str] = typer.Option([], "--hook-prestart"),
        hook_poststop: list[str] = typer.Option([], "--hook-poststop"),
        hostname: str | None = typer.Option(None, "--hostname"),
        workdir: str = typer.Option("/", "--workdir", "-w"),
        detach: bool = typer.Option(False, "--detach", "-d"),
        interactive: bool = typer.Option(
            False, "--interactive", "-i", help="forward stdin to the container (as docker's -i)"
        ),
        tty: bool = typer.Option(False, "--tty", "-t", help="give the container a terminal"),
        rm: bool = typer.Option(False, "--rm", help="remove after it exits (foreground only)"),
        pull: str = typer.Option(
            "missing", "--pull", help="for a reference: missing | always | never"
        ),
    ) -> None:
        """Run a container; in the foreground, stream its output and exit with its status.

        stdin reaches the container only with -i, as with docker (without it the container's
        stdin is /dev/null, so `echo hi | tidal run IMAGE cat` prints nothing; add -i)."""
        if tty and interactive and not detach and not sys.stdin.isatty():
            raise typer.BadParameter(
                "-i -t needs a terminal on stdin; drop -t to pipe data in (-i alone)"
            )
        settings = load_settings()
        volumes = tuple(parse_volume(v) for v in volume)
        targets = [v.target for v in volumes if v.source is None]  # .*= means engine volumes
        quotas = tuple(
            q
            for text in disk_quota
            for q in parse_disk_quota(text, targets, settings.bytes_per_inode)
        )
        spec = ContainerSpec(
            image=_image_arg(image),
            pull=pull,
            command=_argv(command),
            name=name,
            env=parse_env(env),
            workdir=workdir,
            hostname=hostname,
            cpus=parse_cpus_opt(cpus),
            memory_bytes=parse_memory(memory),
            pids_limit=pids_limit,
            volumes=volumes,
            disk_quotas=quotas,
            network=network,
            ports=tuple(parse_port(p) for p in publish),
            runtime=runtime,
            lxcfs=lxcfs,
            rich=rich,
            rich_mode=rich_mode,
            services=tuple(parse_service(s) for s in service),
            initscript=initscript,
            restart=restart,
            prestart_hooks=tuple(parse_hook(h) for h in hook_prestart),
            poststop_hooks=tuple(parse_hook(h) for h in hook_poststop),
            labels=parse_labels(label),
            interactive=interactive,
            tty=tty,
        )
        with _client() as client:
            rec = client.run(spec)
            if detach:
                out.print(rec.id)
                return
            try:
                _attached(client, rec, interactive=interactive, tty=tty)
            except KeyboardInterrupt:
                # Ctrl-C stops the foreground container, as a terminal user expects.
                err.print(f"stopping {rec.name} ...")
                client.stop(rec.id)
            rec = client.wait(rec.id)
            if rm:
                client.remove(rec.id, force=True)
        _exit_with(rec)

    @app.command()
    def attach(
        container: str,
        no_stdin: bool = typer.Option(False, "--no-stdin", help="only watch, send no input"),
    ) -> None:
        """Join a running container started with -i and/or -t: its terminal (or its stdin
        and new output); exits with its status."""
        from tidal.engine.store import ContainerRecord
        from tidal.errors import ContainerStateError

        with _client() as client:
            info = client.inspect(container)
            rec = ContainerRecord.from_api(info)
            path = info.get("attach_socket")
            if not path:
                raise ContainerStateError(
                    f"container {rec.name} is {rec.status} and was not started with -i or -t; "
                    "there is nothing to attach to (tidal logs -f follows its output)"
                )
            interactive = rec.spec.interactive and not no_stdin
            if rec.spec.tty and interactive and not sys.stdin.isatty():
                raise typer.BadParameter(
                    "attaching to a terminal needs one on stdin (or --no-stdin)"
                )
            _attached(
                client,
                rec,
                interactive=interactive,
                tty=rec.spec.tty,
                socket_path=str(path),
                log_tail=0,
            )
            rec = client.wait(rec.id)
        _exit_with(rec)

    @app.command()
    def ps(
        all_: bool = typer.Option(False, "--all", "-a", help="also exited containers"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="only ids, one per line"),
        as_json: bool = typer.Option(False, "--json"),
        label: list[str] = typer.Option(
            [], "--label", "-l", help="only containers with this KEY=VALUE label (repeatable)"
        ),
    ) -> None:
        """List containers (running ones unless --all)."""
        from tidal.engine.store import ContainerRecord

        want = dict(parse_labels(label))
        with _client() as client:
            shown = [
                (r, d)
                for d in client.describe_all()
                for r in (ContainerRecord.from_api(d),)
                if (all_ or r.status == "running") and want.items() <= dict(r.spec.labels).items()
            ]
        if quiet:  # short ids, as docker's: any unique prefix names a container
            sys.stdout.write("".join(f"{r.id[:12]}\n" for r, _ in shown))
            return
        if as_json:
            out.print_json(json.dumps([d for _, d in shown]))
            return
        lines = [f"{'ID':<12}  {'NAME':<20}  {'IMAGE':<30}  {'RUNTIME':<7}  {'IP':<12}  STATUS"]
        for r, d in shown:
            lines.append(
                f"{r.id[:12]:<12}  {r.name[:20]:<20}  {r.spec.image[-30:]:<30}  "
                f"{r.runtime:<7}  {(r.ip or '-'):<12}  {_status_text(r)}{_services_note(d)}"
            )
        sys.stdout.write("\n".join(lines) + "\n")

    @app.command()
    def logs(
        container: str,
        follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until it exits"),
        tail: int | None = typer.Option(None, "--tail", "-n", help="only the last N lines"),
    ) -> None:
        """Print a container's output (stdout and stderr, as written)."""
        if tail is not None and tail < 0:
            raise typer.BadParameter(f"--tail {tail}: give a number of lines, 0 or more")
        with _client() as client:
            if follow:
                for data in client.follow_logs(container, tail=tail):
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
                return
            data, offset, _ = client.logs(container, tail=tail)
            while data:
                sys.stdout.buffer.write(data)
                data, offset, _ = client.logs(container, offset)
            sys.stdout.buffer.flush()

    @app.command("exec", context_settings={"allow_interspersed_args": False})
    def exec_(
        container: str,
        command: list[str] = typer.Argument(..., help="command (after --)"),
        env: list[str] = typer.Option([], "--env", "-e"),
    ) -> None:
        """Run a command in a running container; exits with its status."""
        with _client() as client:
            res = client.exec(container, list(_argv(command)), env=env, stdin=stdin_bytes())
        raise typer.Exit(write_exec_result(res))

    @app.command()
    def stop(
        containers: list[str],
        timeout: float | None = typer.Option(None, "--timeout", "-t", help="seconds to SIGKILL"),
    ) -> None:
        """Stop containers: SIGTERM, then SIGKILL after the timeout."""
        with _client() as client:
            for c in containers:
                rec = client.stop(c, timeout)
                out.print(f"{rec.name}: {_status_text(rec)}", markup=False)

    @app.command()
    def rm(
        containers: list[str],
        force: bool = typer.Option(False, "--force", "-f", help="stop running ones first"),
    ) -> None:
        """Remove containers and everything they hold on the host."""
        with _client() as client:
            for c in containers:
                client.remove(c, force=force)
                out.print(c)

    @app.command()
    def inspect(container: str) -> None:
        """Everything the engine knows about a container, as JSON."""
        with _client() as client:
            out.print_json(json.dumps(client.inspect(container)))

    @app.command(context_settings={"allow_interspersed_args": False})
    def upgrade(
        container: str,
        image: str,
        command: list[str] = typer.Argument(None, help="new command (after --)"),
        timeout: float | None = typer.Option(
            None,
            "--timeout",
            "-t",
            help="seconds from SIGTERM to SIGKILL when stopping the old image (as stop -t)",
        ),
    ) -> None:
        """Swap a container's image in place (same id, name, volumes, IP, quota, limits)."""
        with _client() as client:
            rec = client.upgrade(container, image, _argv(command) or None, timeout_s=timeout)
        out.print(f"{rec.name}: now on {rec.spec.image}, {_status_text(rec)}", markup=False)

    @app.command()
    def update(
        container: str,
        cpus: str | None = typer.Option(None, "--cpus"),
        memory: str | None = typer.Option(None, "--memory", "-m"),
        pids_limit: int | None = typer.Option(None, "--pids-limit"),
    ) -> None:
        """Change CPU, memory or pids limits of a container in place."""
        with _client() as client:
            rec = client.update(
                container,
                cpus=parse_cpus_opt(cpus),
                memory_bytes=parse_memory(memory),
                pids_limit=pids_limit,
            )
        out.print(
            f"{rec.name}: cpus={rec.spec.cpus} memory={rec.spec.memory_bytes} "
            f"pids={rec.spec.pids_limit}",
            markup=False,
        )

    @app.command()
    def daemon(
        metrics_listen: str | None = typer.Option(
            None,
            "--metrics-listen",
            help="Also serve /metrics and /metrics/cadvisor on TCP HOST:PORT (PORT alone: "
            "127.0.0.1), for Prometheus; [engine] metrics_listen in the settings file.",
        ),
    ) -> None:
        """Serve the engine API on its unix socket (foreground; SIGTERM/SIGINT stop it)."""
        import dataclasses

        from tidal.engine.daemon import Daemon
        from tidal.engine.settings import load_settings
        from tidal.instance.service import instance_part

        logging.getLogger("tidal").setLevel(logging.INFO)
        settings = load_settings()
        if metrics_listen is not None:
            settings = dataclasses.replace(settings, metrics_listen=metrics_listen)
        d = Daemon(settings, parts=[instance_part])  # the instance API on the same socket
        signal.signal(signal.SIGTERM, lambda *_: d.request_stop())
        signal.signal(signal.SIGINT, lambda *_: d.request_stop())
        metrics = f", metrics on {settings.metrics_listen}" if settings.metrics_listen else ""
        err.print(
            f"tidal engine daemon: pid {__import__('os').getpid()}, socket {d.socket_path}"
            f"{metrics}, started {datetime.datetime.now().isoformat(timespec='seconds')}"
        )
        t0 = time.monotonic()
        d.serve_forever()
        err.print(f"tidal engine daemon stopped after {time.monotonic() - t0:.0f}s")
