"""``tidal p2p``: run a root node of the per-layer distribution trees, and look at its trees.

Nodes use P2P when ``[blobs] p2p_roots`` (``TIDAL_BLOBS__P2P_ROOTS``) lists the roots: each
lazy mount then serves its layers to other nodes and reads through its tree's parent first.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from tidal.cli.console import err, out

app = typer.Typer(
    help="On-demand P2P: root nodes keep a distribution tree per layer.", no_args_is_help=True
)


@app.command("token")
def token_cmd() -> None:
    """Print a new cluster token (32 random bytes). Store it with `> FILE; chmod 600 FILE` and
    give the same file to every node ([blobs] p2p_token_file) and root (--token-file)."""
    from tidal.service.auth import ClusterToken

    out.print(ClusterToken.generate())


@app.command("root")
def root_cmd(
    token_file: Annotated[
        Path, typer.Option("--token-file", help="the cluster token (see `tidal p2p token`)")
    ],
    host: Annotated[
        str, typer.Option(help="listen address: an internal address other nodes reach")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = 7480,
    fanout: Annotated[int, typer.Option(help="children per node in each layer's tree")] = 4,
) -> None:
    """Serve a P2P root until SIGINT/SIGTERM (trees live in memory; nodes re-join after a restart).

    Only holders of the cluster token may join or list trees, and nodes trust only a root that
    proves it holds the token."""
    from tidal.blobs.p2p import RootServer
    from tidal.service.auth import ClusterToken

    token = ClusterToken.from_file(token_file)
    if host in ("0.0.0.0", "::"):
        err.print(f"p2p root: listening on every interface ({host}); prefer an internal address")
    server = RootServer(host, port, fanout, token=token)
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
    token_file: Annotated[
        Path, typer.Option("--token-file", help="the cluster token (see `tidal p2p token`)")
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the trees a root keeps: each layer's members in join order (first reads the registry)."""
    from tidal.blobs.p2p import RootClient, RootRing
    from tidal.service.auth import ClusterToken

    client = RootClient(RootRing([root]), timeout_s=5, token=ClusterToken.from_file(token_file))
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
