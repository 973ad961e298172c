"""``tidal virtual-node``: register this host as a Kubernetes virtual node and run its pods.

Thin: options -> :class:`~tidal.vnode.node.VirtualNodeSettings`, the official client from the
kubeconfig (or the in-cluster service account), the instance API over the daemon's socket.
Needs the ``vnode`` extra (the ``kubernetes`` client).
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer

from tidal.cli.console import err
from tidal.engine.settings import load_settings
from tidal.extras import require_extra


def host_ip() -> str:
    """The address of the interface the default route leaves by (a UDP connect sends nothing),
    else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any address, never reached
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def virtual_node(
    node_name: Annotated[
        str | None, typer.Option(help="Node name (default: tidal-<hostname>)")
    ] = None,
    region: Annotated[
        str, typer.Option(help="topology.kubernetes.io/region label (the node's site)")
    ] = "",
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            help="kubeconfig file (default: in-cluster service account, else ~/.kube/config)"
        ),
    ] = None,
    node_ip: Annotated[
        str | None, typer.Option(help="InternalIP to report (default: the default route's)")
    ] = None,
    kubelet_port: Annotated[
        int, typer.Option(help="daemonEndpoints.kubeletEndpoint.Port to report")
    ] = 10250,
    max_pods: Annotated[int, typer.Option(help="pods capacity to report")] = 110,
    lease_interval: Annotated[float, typer.Option(help="seconds between lease renewals")] = 10.0,
    status_interval: Annotated[
        float, typer.Option(help="seconds between pod status refreshes")
    ] = 2.0,
) -> None:
    """Register a virtual Kubernetes node whose pods run as Tidal instances on this host."""
    require_extra("vnode", "tidal virtual-node")
    from tidal.instance.client import InstanceClient
    from tidal.vnode.kube import KubernetesNodeApi
    from tidal.vnode.mapping import NodeIdentity
    from tidal.vnode.node import VirtualNode, VirtualNodeSettings

    hostname = socket.gethostname()
    ident = NodeIdentity(
        name=node_name or f"tidal-{hostname}".lower(),
        region=region,
        internal_ip=node_ip or host_ip(),
        hostname=hostname,
        kubelet_port=kubelet_port,
        max_pods=max_pods,
    )
    settings = VirtualNodeSettings(
        ident, lease_interval_s=lease_interval, status_interval_s=status_interval
    )
    kube = KubernetesNodeApi.from_kubeconfig(kubeconfig)
    client = InstanceClient(load_settings().resolved_socket_path())
    client.ping()  # no daemon: one line now, not a node that never gets Ready
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"virtual node {ident.name} ({ident.internal_ip}) serving pods as instances")
    try:
        VirtualNode(kube, client, settings).run(stop)
    finally:
        client.close()
        kube.close()
