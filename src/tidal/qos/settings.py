"""Settings of the node QoS agent: ``[qos]`` in the TOML file, ``TIDAL_QOS__<KEY>`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidal.config import data_root, load_section
from tidal.validation import Port, PositiveFloat, check

DEFAULT_INTERVAL_S = 1.0
"""Collect and decide every second: CPU contention hurts latency within a few CFS periods, and
one second is what co-location agents in production use for their budget loop."""
DEFAULT_API_HOST = "127.0.0.1"
"""The API changes cgroups, so it listens on loopback unless an operator says otherwise."""
DEFAULT_API_PORT = 7460
DEFAULT_STALE_AFTER_S = 5.0
"""Samples older than this make the node 'unhealthy' (the collector is stuck): no adjustments."""
DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class QosSettings:
    interval_s: PositiveFloat = DEFAULT_INTERVAL_S
    api_host: str = DEFAULT_API_HOST
    api_port: Port = DEFAULT_API_PORT
    rules_file: Path | None = None
    """YAML rules; ``None`` means ``$TIDAL_DATA_ROOT/qos/rules.yaml``."""
    state_dir: Path | None = None
    """Journal of applied changes; ``None`` means ``$TIDAL_DATA_ROOT/qos``."""
    cgroup_root: Path = DEFAULT_CGROUP_ROOT
    stale_after_s: PositiveFloat = DEFAULT_STALE_AFTER_S
    watchdog: bool = True
    """Spawn a watchdog process that restores every recorded change if the agent dies."""
    engine_socket: Path | None = None
    """The engine daemon's API socket, for rules' ``engine:`` entries; ``None`` means the
    engine's default, ``$TIDAL_DATA_ROOT/engine/engine.sock``."""

    def __post_init__(self) -> None:
        check(self, "[qos]")

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else data_root() / "qos"

    def resolved_engine_socket(self) -> Path:
        if self.engine_socket is not None:
            return self.engine_socket
        return data_root() / "engine" / "engine.sock"

    def resolved_rules_file(self) -> Path:
        return (
            self.rules_file
            if self.rules_file is not None
            else self.resolved_state_dir() / "rules.yaml"
        )


def load_qos_settings(path: Path | None = None, env: dict[str, str] | None = None) -> QosSettings:
    return load_section("qos", QosSettings, path, env)
