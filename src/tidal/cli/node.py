"""``tidal node ...``: the node service that holds this node's images and mounts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from tidal.cli.console import out

app = typer.Typer(
    help="The node service: one long-lived process holding this node's pulled images and the "
    "FUSE block devices of all its mounts. `tidal pull`, `tidal image mount` and the engine ask "
    "it when it runs. Its mounts outlive it: stopped or killed, they pause (suspended) until "
    "the next `tidal node serve` resumes them.",
    no_args_is_help=True,
)


@app.command()
def serve(
    socket: Path = typer.Option(None, help="Unix socket (default: $TIDAL_DATA_ROOT/node.sock)."),
    snapshotter_socket: Path = typer.Option(
        None,
        "--snapshotter-socket",
        help="Also serve containerd's snapshots API here, from this process (containerd's "
        "[proxy_plugins.tidal] address): containers' images are then mounted by the node "
        "service and survive its restart.",
    ),
    snapshotter_root: Path = typer.Option(
        Path("/var/lib/tidal/snapshotter"),
        "--snapshotter-root",
        help="The snapshotter's metadata and snapshot directories.",
    ),
    metrics_listen: str | None = typer.Option(
        None,
        "--metrics-listen",
        help="Also serve /metrics on TCP HOST:PORT (PORT alone: 127.0.0.1), for Prometheus; "
        "[node] metrics_listen in the settings file.",
    ),
) -> None:
    """Run the node service in the foreground (SIGTERM stops it; its mounts stay, suspended,
    and the next start resumes them)."""
    from tidal.node.service import NodeDaemon
    from tidal.node.settings import NodeSettings, load_node_settings

    logging.basicConfig(
        level=os.environ.get("TIDAL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = load_node_settings()
    if metrics_listen is not None:
        settings = NodeSettings(metrics_listen=metrics_listen)
    daemon = NodeDaemon(socket, metrics_listen=settings.metrics_listen)
    if snapshotter_socket is not None:
        from tidal.extras import require_extra

        require_extra("snapshotter", "tidal node serve --snapshotter-socket", ("grpc",))
        from tidal.snapshotter.backend import LocalBackend
        from tidal.snapshotter.service import SnapshotterServer

        snap = SnapshotterServer(
            snapshotter_socket, snapshotter_root, LocalBackend(node=daemon.node)
        )
        daemon.on_start.append(snap.start)
        daemon.on_close.append(snap.stop)
    out.print(f"node service on {daemon.socket_path}", markup=False)
    daemon.serve_forever()


@app.command()
def status(
    socket: Path = typer.Option(None, help="Unix socket (default: $TIDAL_DATA_ROOT/node.sock)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Whether the node service runs, and which mounts it serves."""
    from tidal.node.client import NodeClient, socket_path

    with NodeClient(socket or socket_path()) as node:
        doc = node.status()
    if as_json:
        out.print(json.dumps(doc, indent=2), markup=False)
        return
    out.print(f"node service pid {doc['pid']}, serving {len(doc['serving'])} mounts", markup=False)
    for fuse_dir in doc["serving"]:
        out.print(f"  {fuse_dir}", markup=False)
