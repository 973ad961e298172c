"""Node service settings (``[node]`` in the TOML file, ``TIDAL_NODE__*`` in the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.config import load_section
from tidal.service.server import parse_listen


@dataclass(frozen=True)
class NodeSettings:
    metrics_listen: str = ""
    """Also serve the node service's ``/metrics`` (and ``/healthz``) on TCP ``HOST:PORT``
    (``PORT`` alone: loopback), for Prometheus; empty: its unix socket only."""

    def __post_init__(self) -> None:
        if self.metrics_listen:
            parse_listen(self.metrics_listen, "[node] metrics_listen")


def load_node_settings() -> NodeSettings:
    return load_section("node", NodeSettings)
