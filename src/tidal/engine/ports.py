"""Published host ports: one owner per port, across the engine's containers and the host."""

from __future__ import annotations

from collections.abc import Iterable

from tidal.engine.network import Network
from tidal.engine.spec import ContainerSpec
from tidal.engine.store import ContainerRecord
from tidal.errors import ConfigError


def check_ports(
    spec: ContainerSpec, cid: str, others: Iterable[ContainerRecord], network: Network
) -> None:
    """Refuse a port another container publishes or another process on the host holds."""
    if not spec.ports:
        return
    for other in others:
        if other.id == cid:
            continue
        for p in other.spec.ports:
            for mine in spec.ports:
                if p.host_port == mine.host_port and p.protocol == mine.protocol:
                    raise ConfigError(
                        f"host port {mine.host_port}/{mine.protocol} is already published by "
                        f"container {other.name} ({other.id[:12]}); choose another --publish"
                    )
    for mine in spec.ports:
        if not network.host_port_free(mine.host_ip, mine.host_port):
            raise ConfigError(
                f"host port {mine.host_ip}:{mine.host_port} is in use by another process "
                "on this host; choose another --publish"
            )
