"""``tidal p2p``: run a root node of the per-layer distribution trees, and look at its trees.

Nodes use P2P when ``[blobs] p2p_roots`` (``TIDAL_BLOBS__P2P_ROOTS``) lists the roots: each
lazy mount then serves its layers to other nodes and reads through its tree's parent first.
"""

from __future__ import annotations

import json
import signal
from typing import Annotated

import typer

from tidal.cli.console import err, out

app = typer.Typer(
    help="On-demand P2P: root nodes keep a distribution tree per layer.", no_args_is_help=True
)


@app.command("root")
def root_cmd(
    host: Annotated[str, typer.Option(help="listen address (0.0.0.0 for other hosts)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="listen port")] = 7480,
    fanout: Annotated[int, typer.Option(help="children per node in each layer's tree")] = 4,
) -> None:
    """Serve a P2P root until SIGINT/SIGTERM (trees live in memory; nodes re-join after a restart)."""
    from tidal.blobs.p2p import RootServer

    server = RootServer(host, port, fanout)
    err.print(f"p2p root: {server.url} (fanout {fanout})")

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command("trees")
def trees_cmd(
    root: Annotated[str, typer.Argument(help="root URL, e.g. http://10.0.0.1:7480")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the trees a root keeps: each layer's members in join order (first reads the registry)."""
    from tidal.blobs.p2p import RootClient, RootRing

    client = RootClient(RootRing([root]), timeout_s=5)
    try:
        trees = client.layers(root)
    finally:
        client.close()
    if as_json:
        out.print_json(json.dumps(trees))
        return
    for digest, members in sorted(trees.items()):
        out.print(f"{digest}: {len(members)} node(s)")
        for i, m in enumerate(members):
            out.print(f"  {i:3d} {m}")
