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
) -> None:
    """Run the node service in the foreground (SIGTERM stops it; its mounts stay, suspended,
    and the next start resumes them)."""
    from tidal.node.service import NodeDaemon

    logging.basicConfig(
        level=os.environ.get("TIDAL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    daemon = NodeDaemon(socket)
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
