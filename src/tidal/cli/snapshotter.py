"""``tidal snapshotter``: serve containerd's snapshots API so containerd can run Tidal images.

containerd talks to it as a proxy plugin (``[proxy_plugins.tidal] type = "snapshot"``, see the
README's "Tidal as a containerd snapshotter"). The gRPC stack is the ``snapshotter`` extra,
imported only when the command runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from tidal.cli.console import err

app = typer.Typer(
    help="containerd snapshotter: Tidal images lazily, ordinary OCI images as overlayfs does.",
    no_args_is_help=True,
)

DEFAULT_SOCKET = Path("/run/tidal/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/tidal/snapshotter")


@app.command("serve")
def serve_cmd(
    socket: Annotated[
        Path,
        typer.Option(
            "--socket",
            help="unix socket to listen on: containerd's \\[proxy_plugins.tidal] address",
        ),
    ] = DEFAULT_SOCKET,
    root: Annotated[
        Path,
        typer.Option(
            "--root",
            help="snapshot metadata (metadata.db) and directories (snapshots/<id>/); one "
            "server per root",
        ),
    ] = DEFAULT_ROOT,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    ] = "INFO",
) -> None:
    """Serve containerd's snapshots gRPC API on SOCKET until SIGTERM or SIGINT.

    Ordinary OCI layers are applied by containerd into overlayfs snapshots under ROOT.

    A layer of a Tidal image pulled with remote-snapshot labels (`ctr-remote images rpull --snapshotter tidal REF`, or the CRI plugin with disable_snapshot_annotations = false) is not downloaded: its metadata goes into the node's image store ($TIDAL_DATA_ROOT/images), and a container's snapshot mounts the image lazily (FUSE -> loop -> ext4) under an overlay.

    On start it remounts the images of recorded snapshots; stopping it leaves running containers' mounts alone.
    """
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.getLogger("tidal").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tidal.snapshotter.backend import LocalBackend
    from tidal.snapshotter.service import SnapshotterServer

    server = SnapshotterServer(socket, root, LocalBackend())
    server.serve_forever(
        lambda: err.print(f"tidal snapshotter: serving {server.socket_path} (root {server.root})")
    )
    # A call still running after the grace period (an unmount waiting for a FUSE server) is
    # abandoned as a crash would abandon it: every change is recorded before it is made, and
    # the next start reconciles. Without this, interpreter exit would join its thread first.
    logging.shutdown()
    os._exit(0)
