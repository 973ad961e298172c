"""OCI runtime bundle ``config.json`` builder: pure functions from a spec to runtime-spec dicts.

Nothing here touches the filesystem; :func:`write_bundle` is the one thin writer. Field names
and shapes follow the OCI runtime specification 1.0 (``process``, ``root``, ``mounts``,
``hooks``, ``linux.resources``, ``linux.namespaces``, ``linux.cgroupsPath``), which runc and crun
both read. Keeping it pure lets tests check limits, mounts, hooks and namespaces without root.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.engine.spec import ContainerSpec, HookSpec
from tidal.fsutil import write_text_atomic

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000
"""CFS period for ``--cpus``: quota = cpus x period, as docker does."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_DIR = "/.tidal"
"""Where the rich-mode init binary and its configuration appear inside the container."""
INIT_STATE_DIR = f"{INIT_DIR}/state"
"""The one writable place below INIT_DIR: the init reports its services' states there."""
LXCFS_PROC_FILES = ("meminfo", "cpuinfo", "stat", "uptime", "loadavg", "diskstats", "swaps")
"""/proc files lxcfs virtualises; each is bind-mounted over the container's own when present."""

DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""docker's default capability set: what ordinary images expect, nothing that escapes."""
CAP_NUMBERS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
"""Kernel numbers of the capabilities the engine grants, to intersect with the host's set."""


def caps_in_mask(mask: int) -> frozenset[str]:
    """Names (of those the engine knows) whose bit is set in a ``CapBnd`` mask."""
    return frozenset(name for name, bit in CAP_NUMBERS.items() if mask >> bit & 1)


RICH_EXTRA_CAPS = ("CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE", "CAP_NET_ADMIN")
"""A rich container runs an init and operations tooling (mount, ps, ip), as in the seeds."""

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Mount:
    """One OCI mount entry."""

    destination: str
    source: str
    type: str = "bind"
    options: tuple[str, ...] = ("rbind", "rw")

    def to_oci(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


def bind(source: str | Path, destination: str, *, readonly: bool = False) -> Mount:
    return Mount(destination, str(source), "bind", ("rbind", "ro" if readonly else "rw"))


@dataclass(frozen=True)
class BundleInputs:
    """What the engine resolved for one start of a container (paths on the host)."""

    container_id: str
    rootfs: str
    args: tuple[str, ...]
    cgroups_path: str
    netns_path: str | None = None
    """Join this network namespace (bridge mode); None: a new empty one, unless network=host."""
    mounts: tuple[Mount, ...] = ()
    lxcfs_proc_dir: str | None = None
    """``<lxcfs mountpoint>/proc`` when lxcfs is on."""
    lxcfs_files: tuple[str, ...] = LXCFS_PROC_FILES
    init_dir: str | None = None
    """Host directory holding the rich-mode init and its conf, bound read-only at INIT_DIR."""
    image_env: tuple[tuple[str, str], ...] = ()
    image_workdir: str | None = None
    nofile_limit: int = 1024
    """RLIMIT_NOFILE inside; the engine passes its own hard limit (a container may not exceed it)."""
    host_caps: frozenset[str] | None = None
    """The engine's own bounding set: a container cannot be granted more (None: no filter)."""
    """RLIMIT_NOFILE inside; the engine passes its own hard limit (a container may not exceed it)."""
    ipc_ns_path: str | None = None
    """Pod member: join this IPC namespace (the sandbox's ``/proc/PID/ns/ipc``)."""
    uts_ns_path: str | None = None
    """Pod member: join this UTS namespace (hostname shared with the sandbox)."""
    annotations: tuple[tuple[str, str], ...] = ()
    """Extra OCI annotations, e.g. the runtime's pod annotations (``Runtime.pod_annotations``)."""
    host_cpus: tuple[int, ...] = ()
    """CPUs the engine may use (its affinity); a ``--cpus`` limit below their number pins the
    container to ``ceil(cpus)`` of them (:func:`cpuset_for`). Empty: no pinning."""


def resources(spec: ContainerSpec) -> dict[str, Any]:
    """``linux.resources`` for the spec's limits; also the body of ``runtime update``."""
    return resources_from(spec.cpus, spec.memory_bytes, spec.pids_limit, spec.cpu_shares)


def resources_from(
    cpus: float | None,
    memory_bytes: int | None,
    pids_limit: int | None,
    cpu_shares: int | None = None,
) -> dict[str, Any]:
    """CPU quota/shares, memory (swap equal to the limit: no swap beyond it), pids."""
    res: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if cpus is not None:
        cpu["quota"] = round(cpus * CPU_PERIOD_US)
        cpu["period"] = CPU_PERIOD_US
        cpu["shares"] = max(2, round(cpus * 1024))
    if cpu_shares is not None:
        cpu["shares"] = cpu_shares
    if cpu:
        res["cpu"] = cpu
    if memory_bytes is not None:
        res["memory"] = {"limit": memory_bytes, "swap": memory_bytes}
    if pids_limit is not None:
        res["pids"] = {"limit": pids_limit}
    return res


def cpuset_for(cpus: float | None, host_cpus: tuple[int, ...], container_id: str) -> str | None:
    """``linux.resources.cpu.cpus`` for a ``--cpus`` limit: ``ceil(cpus)`` of the host's CPUs.

    The CFS quota alone limits CPU *time*; programs that size thread pools by the CPUs they
    may run on (``nproc``, ``os.sched_getaffinity``, the JVM, Go's GOMAXPROCS) read the
    affinity mask, which only a cpuset narrows. Which CPUs: a run of consecutive ones starting
    at an offset taken from the container id, so containers spread over the host's CPUs
    without the engine keeping a ledger. None: no limit, or it covers every host CPU.
    """
    if cpus is None or not host_cpus:
        return None
    n = math.ceil(cpus)
    if n >= len(host_cpus):
        return None
    cpus_sorted = sorted(host_cpus)
    start = int(container_id[:8], 16) % len(cpus_sorted) if container_id else 0
    chosen = sorted(cpus_sorted[(start + i) % len(cpus_sorted)] for i in range(n))
    return ",".join(str(c) for c in chosen)


def hooks(spec: ContainerSpec) -> dict[str, Any]:
    """Runtime-spec ``hooks``: the user's prestart and poststop commands.

    The spec deprecates ``prestart`` in favour of ``createRuntime``; both run in the runtime
    namespace after the container is created, and runc 1.1 and crun 1.8 honour ``prestart``,
    so we emit that. ``poststop`` runs at ``delete``, which the monitor calls
    after every exit, crash included.
    """

    def one(h: HookSpec) -> dict[str, Any]:
        d: dict[str, Any] = {"path": h.path, "args": list(h.args) or [h.path]}
        if h.timeout_s is not None:
            d["timeout"] = h.timeout_s
        return d

    out: dict[str, Any] = {}
    if spec.prestart_hooks:
        out["prestart"] = [one(h) for h in spec.prestart_hooks]
    if spec.poststop_hooks:
        out["poststop"] = [one(h) for h in spec.poststop_hooks]
    return out


def process_env(spec: ContainerSpec, inputs: BundleInputs) -> list[str]:
    """Image environment, then the user's; PATH and HOSTNAME defaulted."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "TERM": "xterm"}
    env.update(dict(inputs.image_env))
    env.update(dict(spec.env))
    env.setdefault("HOSTNAME", hostname(spec, inputs.container_id))
    return [f"{k}={v}" for k, v in env.items()]


def hostname(spec: ContainerSpec, container_id: str) -> str:
    return spec.hostname or spec.name or container_id[:12]


def base_mounts() -> list[Mount]:
    return [
        Mount("/proc", "proc", "proc", ()),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        Mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
        ),
        Mount(
            "/dev/shm", "shm", "tmpfs", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")
        ),
        Mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
        Mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
        Mount(
            "/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")
        ),
    ]


def lxcfs_mounts(proc_dir: str, files: tuple[str, ...]) -> list[Mount]:
    """Bind lxcfs's per-cgroup views over /proc files (read-only, as lxcfs's own hook does)."""
    return [bind(f"{proc_dir}/{name}", f"/proc/{name}", readonly=True) for name in files]


def build_config(spec: ContainerSpec, inputs: BundleInputs) -> dict[str, Any]:
    """The OCI ``config.json`` for one start of the container."""
    caps = list(DEFAULT_CAPS) + (list(RICH_EXTRA_CAPS) if spec.rich else [])
    if inputs.host_caps is not None:
        caps = [c for c in caps if c in inputs.host_caps]
    namespaces: list[dict[str, Any]] = [{"type": "pid"}]
    for kind, path in (("ipc", inputs.ipc_ns_path), ("uts", inputs.uts_ns_path)):
        namespaces.append({"type": kind, "path": path} if path else {"type": kind})
    namespaces.append({"type": "mount"})
    if inputs.netns_path and (spec.network == "bridge" or spec.sandbox is not None):
        namespaces.append({"type": "network", "path": inputs.netns_path})
    elif spec.network != "host":
        namespaces.append({"type": "network"})

    mounts = base_mounts()
    if spec.network == "host":
        mounts.append(bind("/etc/resolv.conf", "/etc/resolv.conf", readonly=True))
    if spec.rich and spec.rich_mode == "systemd":
        mounts += [
            Mount("/run", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=755")),
            Mount("/tmp", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777")),
        ]
    if inputs.lxcfs_proc_dir:
        mounts += lxcfs_mounts(inputs.lxcfs_proc_dir, inputs.lxcfs_files)
    if inputs.init_dir:
        mounts.append(bind(inputs.init_dir, INIT_DIR, readonly=True))
        mounts.append(bind(f"{inputs.init_dir}/state", INIT_STATE_DIR))
    mounts += list(inputs.mounts)

    res = resources(spec)
    cpuset = cpuset_for(spec.cpus, inputs.host_cpus, inputs.container_id)
    if cpuset is not None:
        res.setdefault("cpu", {})["cpus"] = cpuset
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}], **res},
        "cgroupsPath": inputs.cgroups_path,
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": spec.tty,
            "user": {"uid": 0, "gid": 0},
            "args": list(inputs.args),
            "env": process_env(spec, inputs),
            "cwd": spec.workdir if spec.workdir != "/" else (inputs.image_workdir or "/"),
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": inputs.nofile_limit, "soft": inputs.nofile_limit}
            ],
            "noNewPrivileges": not spec.rich,
            "oomScoreAdj": 0,
        },
        "root": {"path": inputs.rootfs, "readonly": spec.read_only_rootfs},
        "hostname": hostname(spec, inputs.container_id),
        "mounts": [m.to_oci() for m in mounts],
        "linux": linux,
    }
    if inputs.uts_ns_path:
        del config["hostname"]  # the joined UTS namespace has the pod's hostname already
    hk = hooks(spec)
    if hk:
        config["hooks"] = hk
    config["annotations"] = {"org.tidal.container.id": inputs.container_id}
    config["annotations"].update(dict(inputs.annotations))
    if spec.name:
        config["annotations"]["org.tidal.container.name"] = spec.name
    return config


def init_conf(spec: ContainerSpec, main_argv: tuple[str, ...]) -> str:
    """The rich-mode init's configuration: one tab-separated line per item.

    ``initscript PATH`` / ``main POLICY MAX argv...`` / ``service NAME POLICY MAX argv...``.
    A line format keeps the C init free of a JSON parser; the spec validator rejects tabs and
    newlines in arguments.
    """
    lines = []
    if spec.initscript:
        lines.append(f"initscript\t{spec.initscript}")
    lines.append("\t".join(["main", spec.restart, "10", *main_argv]))
    for s in spec.services:
        lines.append("\t".join(["service", s.name, s.restart, str(s.max_restarts), *s.argv]))
    return "\n".join(lines) + "\n"


def rich_args(spec: ContainerSpec, main_argv: tuple[str, ...]) -> tuple[str, ...]:
    """PID 1's argv: Tidal's init reading its conf, or the image's own init (systemd mode)."""
    if spec.rich_mode == "systemd":
        return ("/sbin/init",)
    return (f"{INIT_DIR}/init", f"{INIT_DIR}/init.conf")


def write_bundle(bundle_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``config.json`` atomically (a crashed writer never leaves half a file)."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    path = bundle_dir / "config.json"
    write_text_atomic(path, json.dumps(config, indent=1))
    return path
