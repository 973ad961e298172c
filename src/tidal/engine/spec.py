"""What a user asks for when running a container: frozen values, parsers for CLI forms, JSON.

A :class:`ContainerSpec` is the whole request (image, command, limits, volumes, quota, network,
rich mode, hooks, runtime). It travels as JSON from the CLI to the daemon and is stored as JSON
in the state database, so every field is a plain value and the round trip is lossless.
Parsing of user input (``--env K=V``, ``--volume SRC:DST``, ``--disk-quota /data=10G``,
``--publish 8080:80``) lives here and raises :class:`ConfigError` naming the bad text.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from tidal.engine.crilog import CriLogSpec
from tidal.errors import ConfigError, QuotaError
from tidal.node.references import check_pull_policy
from tidal.units import parse_cpus, parse_size

RUNTIMES = ("runc", "crun", "runsc")
NETWORK_MODES = ("none", "host", "bridge")
RESTART_POLICIES = ("no", "on-failure", "always")
RICH_MODES = ("init", "systemd")
DEFAULT_SERVICE_RESTARTS = 10
"""Restarts the rich-mode init makes of a failing service before it gives up (and says so)."""
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_CGROUP_PARENT_RE = re.compile(r"[a-zA-Z0-9_.-]+(/[a-zA-Z0-9_.-]+)*")


@dataclass(frozen=True)
class VolumeSpec:
    """A volume: a host directory bind-mounted (``source`` set) or an engine-owned directory.

    Engine-owned volumes live with the container and survive ``upgrade``; with a quota of their
    own they are a separate ext4 volume (bytes and inodes limited).
    """

    target: str
    source: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class QuotaSpec:
    """A disk quota: ``target`` is ``/`` for the writable rootfs layer or a volume's mount point."""

    target: str
    size_bytes: int
    inodes: int | None = None


@dataclass(frozen=True)
class PortMapping:
    """Publish ``container_port`` of a bridge-networked container on the host."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = "0.0.0.0"


@dataclass(frozen=True)
class ServiceSpec:
    """An extra service supervised by the rich-mode init next to the main command."""

    name: str
    argv: tuple[str, ...]
    restart: str = "always"
    max_restarts: int = DEFAULT_SERVICE_RESTARTS


@dataclass(frozen=True)
class HookSpec:
    """A host-side command the runtime runs with the container state JSON on stdin."""

    path: str
    args: tuple[str, ...] = ()
    timeout_s: int | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """Everything ``tidal run`` asks for. Sizes in bytes, CPU in cores."""

    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    hostname: str | None = None
    interactive: bool = False
    """``-i``: the container's stdin stays open for an attached client (else /dev/null)."""
    tty: bool = False
    """``-t``: the container's stdio is a pseudo-terminal, relayed by its monitor."""
    cpus: float | None = None
    cpu_shares: int | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None
    volumes: tuple[VolumeSpec, ...] = ()
    disk_quotas: tuple[QuotaSpec, ...] = ()
    network: str = "none"
    ports: tuple[PortMapping, ...] = ()
    runtime: str | None = None
    lxcfs: bool | None = None
    """None: the engine's default (on where lxcfs is available)."""
    rich: bool = False
    rich_mode: str = "init"
    services: tuple[ServiceSpec, ...] = ()
    initscript: str | None = None
    restart: str = "no"
    """Rich mode: restart policy of the main command inside the container."""
    prestart_hooks: tuple[HookSpec, ...] = ()
    poststop_hooks: tuple[HookSpec, ...] = ()
    labels: tuple[tuple[str, str], ...] = field(default=())
    pull: str = "missing"
    """When ``image`` is a registry reference: pull it if the node lacks it (``missing``),
    every time (``always``) or never (``never``); resolved by the engine before the rootfs."""
    sandbox: str | None = None
    """Pod member: id or name of the pod's sandbox (infra) container, whose network, IPC and
    UTS namespaces this container joins (by path under runc/crun; through the runtime's pod
    annotations where one sandbox kernel holds the pod). Looked up at start, so a member can
    be created alongside its sandbox (by name). None: a container of its own."""
    pod_sandbox: bool = False
    """This container is a pod's sandbox (infra) container, the one members join."""
    read_only_rootfs: bool = False
    """``--read-only``: the root is the image's tree itself, mounted read-only by the runtime:
    no writable layer, no overlay and no quota volume (a pod's sandbox, which writes nothing;
    one mount fewer per container in every mount table the node's processes read)."""
    cgroup_parent: str | None = None
    """Place the container's cgroup below this path (a pod's cgroup, which holds the pod-level
    limits) instead of ``[engine] cgroup_parent``."""
    cri_log: CriLogSpec | None = None
    """Also write the container's output as the kubelet lays it out (an instance member's,
    under ``[instance] pod_log_dir``); its monitor then tells stdout from stderr."""

    def __post_init__(self) -> None:
        validate_spec(self)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerSpec:
        """Inverse of :meth:`to_json`; unknown keys are an error (a newer client, say so)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"container spec has unknown field(s) {sorted(unknown)}")
        d = dict(data)
        d["command"] = tuple(d.get("command", ()))
        d["env"] = tuple((str(k), str(v)) for k, v in d.get("env", ()))
        d["labels"] = tuple((str(k), str(v)) for k, v in d.get("labels", ()))
        d["volumes"] = tuple(VolumeSpec(**v) for v in d.get("volumes", ()))
        d["disk_quotas"] = tuple(QuotaSpec(**q) for q in d.get("disk_quotas", ()))
        d["ports"] = tuple(PortMapping(**p) for p in d.get("ports", ()))
        d["services"] = tuple(
            ServiceSpec(**{**s, "argv": tuple(s["argv"])}) for s in d.get("services", ())
        )
        if d.get("cri_log"):
            d["cri_log"] = CriLogSpec(**d["cri_log"])
        for key in ("prestart_hooks", "poststop_hooks"):
            d[key] = tuple(HookSpec(**{**h, "args": tuple(h["args"])}) for h in d.get(key, ()))
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"container spec is malformed: {exc}") from exc

    def replace(self, **changes: Any) -> ContainerSpec:
        return dataclasses.replace(self, **changes)


def validate_spec(spec: ContainerSpec) -> None:
    """Reject specs that cannot run, with the field and the fix in the message."""
    if not spec.image:
        raise ConfigError(
            "container spec needs an image (a registry reference, a Tidal image directory or "
            "a rootfs directory)"
        )
    check_pull_policy(spec.pull)
    if spec.name is not None and not _NAME_RE.match(spec.name):
        raise ConfigError(
            f"container name {spec.name!r} is invalid; use letters, digits, '_', '.', '-' "
            "(at most 63, starting with a letter or digit)"
        )
    if spec.runtime is not None and spec.runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {spec.runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if spec.network not in NETWORK_MODES:
        raise ConfigError(f"unknown network {spec.network!r}; choose one of {NETWORK_MODES}")
    if spec.sandbox is not None:
        if spec.network != "none" or spec.ports:
            raise ConfigError(
                "a pod member takes its network from its sandbox; give --network and "
                "--publish to the pod (instance), not to the member"
            )
        if spec.pod_sandbox:
            raise ConfigError("a pod's sandbox container cannot itself join another sandbox")
    if spec.read_only_rootfs and any(
        q.target == "/" and q.size_bytes > 0 for q in spec.disk_quotas
    ):
        raise ConfigError(
            "a read-only root has no writable layer to bound: drop the disk quota on / or "
            "the read-only root"
        )
    if spec.cgroup_parent is not None and not _CGROUP_PARENT_RE.fullmatch(spec.cgroup_parent):
        raise ConfigError(
            f"cgroup parent {spec.cgroup_parent!r}: a relative path such as 'tidal/pod-web'"
        )
    if spec.ports and spec.network != "bridge":
        raise ConfigError("publishing ports needs --network bridge")
    if spec.restart not in RESTART_POLICIES:
        raise ConfigError(f"unknown restart policy {spec.restart!r}; use {RESTART_POLICIES}")
    if spec.rich_mode not in RICH_MODES:
        raise ConfigError(f"unknown rich mode {spec.rich_mode!r}; use {RICH_MODES}")
    if (spec.services or spec.initscript or spec.restart != "no") and not spec.rich:
        raise ConfigError("--service, --initscript and --restart need rich mode (--rich)")
    if spec.cpus is not None and spec.cpus <= 0:
        raise ConfigError(f"--cpus must be positive, got {spec.cpus}")
    if spec.memory_bytes is not None and spec.memory_bytes < 4 * 1024 * 1024:
        raise ConfigError(f"--memory {spec.memory_bytes} bytes is below the 4 MiB minimum")
    if spec.pids_limit is not None and spec.pids_limit < 1:
        raise ConfigError(f"--pids-limit must be at least 1, got {spec.pids_limit}")
    targets = [v.target for v in spec.volumes]
    for t in targets:
        if not t.startswith("/") or t == "/":
            raise ConfigError(f"volume target {t!r} must be an absolute path other than /")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"two volumes share a target: {targets}")
    seen_ports: set[tuple[int, str]] = set()
    for p in spec.ports:
        if (p.host_port, p.protocol) in seen_ports:
            raise ConfigError(f"host port {p.host_port}/{p.protocol} is published twice")
        seen_ports.add((p.host_port, p.protocol))
        if p.protocol != "tcp":
            raise ConfigError(f"port {p.host_port}: only tcp publishing is supported")
    for s in spec.services:
        for a in s.argv:
            if "\t" in a or "\n" in a:
                raise ConfigError(f"service {s.name!r}: arguments must not contain tabs/newlines")
        if s.restart not in RESTART_POLICIES:
            raise ConfigError(f"service {s.name!r}: unknown restart policy {s.restart!r}")
        if not s.argv:
            raise ConfigError(f"service {s.name!r} has no command")
    for h in (*spec.prestart_hooks, *spec.poststop_hooks):
        if not h.path.startswith("/"):
            raise ConfigError(f"hook {h.path!r}: the runtime spec needs an absolute path")
    for q in spec.disk_quotas:
        if q.target != "/" and q.target not in targets:
            raise QuotaError(
                f"disk quota for {q.target}: no volume is mounted there; add --volume {q.target}"
            )
        if q.target != "/" and any(v.target == q.target and v.source for v in spec.volumes):
            raise QuotaError(
                f"disk quota for {q.target}: it is a host directory bind mount, which an "
                f"engine volume quota cannot limit; drop the host path (--volume {q.target})"
            )


# --- parsers for CLI forms ------------------------------------------------------------------


def parse_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``K=V`` pairs; a bare ``K`` is an error (no implicit host environment leak)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return tuple(out)


_LABEL_KEY_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_./-]{0,252}$")


def parse_labels(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``K=V`` labels (what the QoS agent and other tools select containers by); keys unique."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY_RE.match(key):
            raise ConfigError(
                f"--label {item!r}: expected KEY=VALUE with a key of letters, digits, '_./-'"
            )
        if key in out:
            raise ConfigError(f"--label {key!r} is given twice")
        out[key] = value
    return tuple(out.items())


def parse_volume(text: str) -> VolumeSpec:
    """``/dst`` (engine volume), ``/src:/dst`` or ``/src:/dst:ro`` (host bind mount)."""
    parts = text.split(":")
    readonly = False
    if parts[-1] in ("ro", "rw") and len(parts) > 1:
        readonly = parts.pop() == "ro"
    if len(parts) == 1:
        return VolumeSpec(target=parts[0], readonly=readonly)
    if len(parts) == 2:
        src, dst = parts
        if not src.startswith("/"):
            raise ConfigError(f"--volume {text!r}: the host path must be absolute")
        return VolumeSpec(target=dst, source=src, readonly=readonly)
    raise ConfigError(f"--volume {text!r}: expected /dst, /src:/dst or /src:/dst:ro")


def parse_disk_quota(
    text: str, volume_targets: list[str], bytes_per_inode: int
) -> tuple[QuotaSpec, ...]:
    """``SIZE[,inodes=N]`` (rootfs), ``/data=SIZE`` (one volume), ``.*=SIZE`` (rootfs and each
    engine volume in ``volume_targets``; host bind mounts cannot be limited this way).

    Without ``inodes=`` the inode budget is ``size / bytes_per_inode``, so both bytes and inodes
    are always limited.
    """
    main, *opts = text.split(",")
    inodes: int | None = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key.strip() != "inodes" or not value.strip().isdigit():
            raise QuotaError(f"--disk-quota {text!r}: unknown option {opt!r}; use inodes=N")
        inodes = int(value)
    target, sep, size_text = main.rpartition("=")
    if not sep:
        target, size_text = "/", main
    try:
        size = parse_size(size_text)
    except ConfigError as exc:
        raise QuotaError(f"--disk-quota {text!r}: {exc}") from None
    if size < 16 * 1024 * 1024:
        raise QuotaError(f"--disk-quota {text!r}: at least 16M is needed for an ext4 volume")
    n = inodes if inodes is not None else max(size // bytes_per_inode, 64)
    targets = ["/", *volume_targets] if target == ".*" else [target]
    return tuple(QuotaSpec(target=t, size_bytes=size, inodes=n) for t in targets)


def parse_port(text: str) -> PortMapping:
    """``HOST:CONTAINER``, ``IP:HOST:CONTAINER`` or ``HOST:CONTAINER/tcp``."""
    body, _, proto = text.partition("/")
    parts = body.split(":")
    host_ip = "0.0.0.0"
    if len(parts) == 3:
        host_ip = parts.pop(0)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--publish {text!r}: expected HOST_PORT:CONTAINER_PORT")
    host, cont = int(parts[0]), int(parts[1])
    for p in (host, cont):
        if not 0 < p < 65536:
            raise ConfigError(f"--publish {text!r}: port {p} is out of range 1-65535")
    return PortMapping(
        host_port=host, container_port=cont, protocol=proto or "tcp", host_ip=host_ip
    )


def _shell_words(text: str, what: str) -> tuple[str, ...]:
    """``text`` split as a POSIX shell would (quotes, backslashes), without running a shell."""
    import shlex  # only with --service/--hook: every CLI command imports this module

    try:
        return tuple(shlex.split(text))
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ConfigError(f"{what} {text!r}: {str(exc).lower()}") from None


def parse_service(text: str) -> ServiceSpec:
    """``NAME[:POLICY[:MAX]]=COMMAND ARGS`` as in ``--service 'web:always:3=httpd -f -h
    "/srv/my site"'``; the command is split with shell rules (quotes group words); MAX is how
    many restarts the init makes before it gives up on the service (default 10)."""
    head, sep, cmd = text.partition("=")
    if not sep or not cmd.strip():
        raise ConfigError(f"--service {text!r}: expected NAME[:POLICY[:MAX]]=COMMAND")
    name, _, rest = head.partition(":")
    policy, _, max_text = rest.partition(":")
    if max_text and not max_text.isdigit():
        raise ConfigError(f"--service {text!r}: MAX restarts {max_text!r} is not a number")
    argv = _shell_words(cmd, "--service")
    if not argv or not argv[0]:
        raise ConfigError(f"--service {text!r}: expected NAME[:POLICY[:MAX]]=COMMAND")
    return ServiceSpec(
        name=name,
        argv=argv,
        restart=policy or "always",
        max_restarts=int(max_text) if max_text else DEFAULT_SERVICE_RESTARTS,
    )


def parse_hook(text: str) -> HookSpec:
    """A hook command line split with shell rules; the first word must be an absolute path."""
    words = _shell_words(text, "hook")
    if not words or not words[0]:
        raise ConfigError("empty hook command")
    return HookSpec(path=words[0], args=words)


def parse_memory(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


def parse_cpus_opt(text: str | None) -> float | None:
    return None if text is None else parse_cpus(text)
