"""Engine settings (``[engine]`` in the TOML file, ``TIDAL_ENGINE__*`` in the environment)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from tidal.config import data_root, load_section
from tidal.errors import ConfigError
from tidal.validation import NonNegativeFloat, NonNegativeInt, PositiveInt, check

DEFAULT_RUNTIME: Final = "runc"
"""runc is the single-tenant default named by the seeds; crun is the faster C alternative;
runsc (gVisor) the multi-tenant sandbox."""
RUNSC_ENGINE_FLAGS = ("--root", "--network", "--log", "--log-format")
"""runsc flags the driver sets per container or per runtime root; settings may not."""
DEFAULT_DISK_QUOTA_BYTES = 10 * 1024**3
"""Each container's writable layer is an ext4 volume of this size unless ``--disk-quota`` says otherwise."""
DEFAULT_BYTES_PER_INODE = 16 * 1024
"""Inode budget of a quota volume when none is given: mke2fs's own default ratio."""
DEFAULT_STOP_TIMEOUT_S = 10.0
"""Grace period between SIGTERM and SIGKILL in ``stop``, as in docker."""
DEFAULT_SUBNET = "10.88.0.0/24"
"""Bridge network addresses; .1 is the gateway on the bridge."""
DEFAULT_BRIDGE = "tidal0"
DEFAULT_CGROUP_PARENT = "tidal"
"""Containers' cgroups live under ``/<parent>/<id>`` in every v1 hierarchy."""
DEFAULT_VOLUME_POOL_SIZE = 2
DEFAULT_HOT_IMAGES = 8
DEFAULT_HOT_IMAGE_IDLE_S = 1800.0
"""Quota volumes of the default shape kept formatted ahead of time (0: format at each start)."""
DEFAULT_UPGRADE_PROBE_S = 1.0
"""After an upgrade the container must stay up (or exit 0) this long, else it is rolled back."""


@dataclass(frozen=True)
class EngineSettings:
    """Where the engine keeps its state and what it does by default."""

    runtime: Literal["runc", "crun", "runsc"] = DEFAULT_RUNTIME
    """The runtime of containers whose spec names none (``tidal run --runtime``)."""
    runc_binary: str | None = None
    """Path of the runc binary; None: ``runc`` on PATH."""
    crun_binary: str | None = None
    """Path of the crun binary; None: ``crun`` on PATH."""
    runsc_binary: str | None = None
    """Path of the runsc binary; None: ``runsc`` on PATH."""
    runsc_flags: tuple[str, ...] = ()
    """Global runsc flags added after the driver's defaults (``--platform=ptrace
    --overlay2=none --cpu-num-from-quota``; a later flag wins): e.g. ``--platform=kvm`` on bare
    metal, ``--debug --debug-log=/tmp/runsc/`` to trace a sandbox."""
    state_dir: Path | None = None
    """Default ``$TIDAL_DATA_ROOT/engine``."""
    socket_path: Path | None = None
    """Default ``<state_dir>/engine.sock``."""
    metrics_listen: str = ""
    """Also serve ``/metrics`` and ``/metrics/cadvisor`` (only those, and ``/healthz``) on
    TCP ``HOST:PORT`` (``PORT`` alone: loopback), for Prometheus; empty: the socket only."""
    default_disk_quota_bytes: NonNegativeInt = DEFAULT_DISK_QUOTA_BYTES
    bytes_per_inode: PositiveInt = DEFAULT_BYTES_PER_INODE
    stop_timeout_s: NonNegativeFloat = DEFAULT_STOP_TIMEOUT_S
    subnet: str = DEFAULT_SUBNET
    bridge: str = DEFAULT_BRIDGE
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    lxcfs: Literal["auto", "on", "off"] = "auto"
    """``auto`` (use lxcfs when the binary exists), ``on`` or ``off``."""
    upgrade_probe_s: NonNegativeFloat = DEFAULT_UPGRADE_PROBE_S
    volume_pool_size: NonNegativeInt = DEFAULT_VOLUME_POOL_SIZE
    hot_images: NonNegativeInt = DEFAULT_HOT_IMAGES
    """Image mounts kept after their last container went (the node's image cache: the next
    container of a hot image starts without a mount); the least recently used beyond this
    many are released. 0: released with the last user."""
    hot_image_idle_s: NonNegativeFloat = DEFAULT_HOT_IMAGE_IDLE_S
    """A hot image mount unused for longer than this is released."""
    pin_cpus: bool = True
    """Pin a ``--cpus`` container to ``ceil(cpus)`` CPUs, so ``nproc`` and thread pools see the
    limit (only where the cpuset controller exists); off: the CFS quota alone, as docker."""

    def __post_init__(self) -> None:
        """Reject a bad setting when the daemon starts, not at the first ``tidal run``."""
        where = "[engine]"
        check(self, where)
        try:
            net = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise ConfigError(f"{where} subnet {self.subnet!r}: {exc}") from None
        if net.version != 4 or net.num_addresses < 4:
            raise ConfigError(
                f"{where} subnet {self.subnet!r}: need an IPv4 subnet of /30 or wider"
            )
        if not re.fullmatch(r"[a-zA-Z0-9_.-]{1,15}", self.bridge):
            raise ConfigError(
                f"{where} bridge {self.bridge!r}: an interface name of 1-15 characters"
            )
        for flag in self.runsc_flags:
            if not flag.startswith("--") or flag.split("=", 1)[0] in RUNSC_ENGINE_FLAGS:
                raise ConfigError(
                    f"{where} runsc_flags {flag!r}: give global flags as --name[=value]; "
                    f"{', '.join(RUNSC_ENGINE_FLAGS)} are the engine's to set"
                )
        if self.metrics_listen:
            from tidal.service.server import parse_listen  # not on the monitor's imports

            parse_listen(self.metrics_listen, f"{where} metrics_listen")
        if not re.fullmatch(r"[a-zA-Z0-9_.-]+(/[a-zA-Z0-9_.-]+)*", self.cgroup_parent):
            raise ConfigError(
                f"{where} cgroup_parent {self.cgroup_parent!r}: a relative path such as 'tidal'"
            )

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else data_root() / "engine"

    def runtime_binary(self, name: str) -> str | None:
        """The configured binary of runtime ``name`` (None: found on PATH)."""
        return {"runc": self.runc_binary, "crun": self.crun_binary, "runsc": self.runsc_binary}.get(
            name
        )

    def runtime_options(self, name: str) -> tuple[str, ...]:
        return self.runsc_flags if name == "runsc" else ()

    def resolved_socket_path(self) -> Path:
        if self.socket_path is not None:
            return self.socket_path
        return self.resolved_state_dir() / "engine.sock"


def load_settings() -> EngineSettings:
    """Engine settings from defaults, the config file and the environment."""
    return load_section("engine", EngineSettings)
