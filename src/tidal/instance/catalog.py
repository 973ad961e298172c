"""Instance types and the ``[instance]`` settings: embedded defaults plus the settings file.

A type names pod-level limits (``2c4g``: 2 CPUs, 4 GiB, and bandwidth, packet rate, disk
throughput and pids that scale with it). The embedded catalogue covers the usual shapes; the
settings file adds or replaces types::

    [instance.types.2c4g]
    cpus = 2
    memory_bytes = 4294967296
    egress_bps = 200000000
    disk_write_bps = 104857600

Node capacity for the fallback choice is the node's CPUs and memory unless
``capacity_cpus`` / ``capacity_memory_bytes`` say otherwise (e.g. to keep room for the system).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tidal.config import load_section
from tidal.errors import ConfigError
from tidal.instance.spec import InstanceType, Limits
from tidal.units import GiB, MiB
from tidal.validation import check

MBIT = 1_000_000
DEFAULT_POD_LOG_DIR = "/var/log/pods"
"""The kubelet's root of container logs: a node's log shipper already reads it."""
DEFAULT_CONTAINER_LOG_DIR = "/var/log/containers"
"""The kubelet's directory of links to the current log of each container."""


def _shape(cpus: float, memory_gib: float) -> Limits:
    """Bandwidth, packets, disk and pids scale with the CPU count (as cloud shapes do)."""
    return Limits(
        cpus=cpus,
        memory_bytes=int(memory_gib * GiB),
        pids=int(512 * cpus),
        egress_bps=int(100 * MBIT * cpus),
        ingress_bps=int(100 * MBIT * cpus),
        egress_pps=int(10_000 * cpus),
        ingress_pps=int(10_000 * cpus),
        disk_read_bps=int(50 * MiB * cpus),
        disk_write_bps=int(50 * MiB * cpus),
        disk_read_iops=int(1_000 * cpus),
        disk_write_iops=int(1_000 * cpus),
    )


EMBEDDED_TYPES: dict[str, Limits] = {
    "1c1g": _shape(1, 1),
    "1c2g": _shape(1, 2),
    "2c2g": _shape(2, 2),
    "2c4g": _shape(2, 4),
    "2c8g": _shape(2, 8),
    "4c8g": _shape(4, 8),
    "4c16g": _shape(4, 16),
    "8c16g": _shape(8, 16),
    "8c32g": _shape(8, 32),
}
"""What a node knows with no settings file: common shapes, 100 Mbit/s, 10k packets/s,
50 MiB/s and 1,000 IOPS of disk, 512 pids per CPU."""


@dataclass(frozen=True)
class TypeSettings:
    """One ``[instance.types.NAME]`` table: each key as in :class:`~tidal.instance.spec.Limits`."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    egress_bps: int | None = None
    ingress_bps: int | None = None
    egress_pps: int | None = None
    ingress_pps: int | None = None
    disk_read_bps: int | None = None
    disk_write_bps: int | None = None
    disk_read_iops: int | None = None
    disk_write_iops: int | None = None


@dataclass(frozen=True)
class InstanceSettings:
    """``[instance]``: extra or replaced types, the node capacity, the default type."""

    types: dict[str, TypeSettings] = field(default_factory=dict)
    pod_log_dir: str = DEFAULT_POD_LOG_DIR
    """Where each instance container's output is also written as the kubelet lays it out,
    ``<dir>/<namespace>_<pod>_<uid>/<container>/<restart>.log`` (empty: not written)."""
    container_log_dir: str = DEFAULT_CONTAINER_LOG_DIR
    """Where the ``<pod>_<namespace>_<container>-<id>.log`` links go (empty: none)."""
    capacity_cpus: float | None = None
    """CPUs instances may reserve on this node (default: all of the node's)."""
    capacity_memory_bytes: int | None = None
    """Memory instances may reserve (default: the node's MemTotal)."""
    default_spec: str = ""
    """Type of an instance run without ``--spec`` (empty: only its ad-hoc limits)."""
    pool_max: int = 0
    """Warm sandboxes per shape at most (:mod:`tidal.instance.pool`); 0 turns pools off. Off
    by default: a warm member holds a running sandbox, an address and a share of the node's
    capacity, which an operator should opt into."""
    pool_min: int = 0
    """Warm sandboxes a shape seen on this node keeps even when idle (the learned target's
    floor, :mod:`tidal.instance.reuse`); 0: idle shapes give all their room back."""

    def __post_init__(self) -> None:
        check(self, "[instance]")
        if self.capacity_cpus is not None and self.capacity_cpus <= 0:
            raise ConfigError(
                f"[instance] capacity_cpus must be positive, got {self.capacity_cpus}"
            )
        if self.capacity_memory_bytes is not None and self.capacity_memory_bytes <= 0:
            raise ConfigError("[instance] capacity_memory_bytes must be positive")
        if self.pool_max < 0 or self.pool_min < 0:
            raise ConfigError(
                f"[instance] pool_max ({self.pool_max}) and pool_min ({self.pool_min}) "
                "must be 0 or more"
            )
        if self.pool_min > self.pool_max:
            raise ConfigError(
                f"[instance] pool_min ({self.pool_min}) is above pool_max ({self.pool_max}); "
                "raise pool_max or lower pool_min"
            )


def load_instance_settings() -> InstanceSettings:
    return load_section("instance", InstanceSettings)


class Catalog:
    """The instance types this node knows: embedded ones, then the settings file's."""

    def __init__(self, settings: InstanceSettings | None = None) -> None:
        self.settings = settings or InstanceSettings()
        self.types: dict[str, Limits] = dict(EMBEDDED_TYPES)
        for name, ts in self.settings.types.items():
            try:
                self.types[name] = Limits(**dataclasses.asdict(ts))
            except ConfigError as exc:
                raise ConfigError(f"[instance.types.{name}]: {exc}") from None
        if self.settings.default_spec and self.settings.default_spec not in self.types:
            raise ConfigError(
                f"[instance] default_spec {self.settings.default_spec!r} is not a known type"
            )

    def get(self, name: str) -> InstanceType:
        try:
            return InstanceType(name, self.types[name])
        except KeyError:
            raise ConfigError(
                f"unknown instance spec {name!r}; known: {', '.join(sorted(self.types))} "
                "(add more under [instance.types.NAME] in the settings file)"
            ) from None

    def resolve(self, names: tuple[str, ...]) -> list[InstanceType]:
        """The named types in order (every name checked before any is used)."""
        if not names and self.settings.default_spec:
            names = (self.settings.default_spec,)
        return [self.get(n) for n in names]
