"""Entry point of the ``tidal`` command.

Each part registers its commands from its own module (``tidal.cli.image``, ``.engine``,
``.sched``, ``.qos``); this module only assembles them and turns :class:`TidalError` into a
one-line message and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape

from tidal.cli import demo as demo_cli
from tidal.cli import engine as engine_cli
from tidal.cli import image as image_cli
from tidal.cli import images as images_cli
from tidal.cli import instance as instance_cli
from tidal.cli import node as node_cli
from tidal.cli import p2p as p2p_cli
from tidal.cli import qos as qos_cli
from tidal.cli import sched as sched_cli
from tidal.cli import snapshotter as snapshotter_cli
from tidal.cli import vnode as vnode_cli
from tidal.cli.console import err
from tidal.errors import TidalError
from tidal.extras import missing_extra_error

app = typer.Typer(
    name="tidal",
    help="Tidal: lazy block images, containers on them, elastic scheduling and node QoS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image_cli.app, name="image")
app.add_typer(sched_cli.app, name="sched")
app.add_typer(qos_cli.app, name="qos")
app.add_typer(p2p_cli.app, name="p2p")
app.add_typer(instance_cli.app, name="instance")
app.add_typer(node_cli.app, name="node")
app.add_typer(snapshotter_cli.app, name="snapshotter")
engine_cli.register(app)
images_cli.register(app)
app.command(name="demo")(demo_cli.demo)
app.command(name="virtual-node")(vnode_cli.virtual_node)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors Tidal knows about print one line, not a traceback."""
    logging.basicConfig(
        level=os.environ.get("TIDAL_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app(args=argv, standalone_mode=True)
    except TidalError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        sys.exit(1)
    except ModuleNotFoundError as exc:
        missing = missing_extra_error(exc)
        if missing is None:
            raise
        err.print(f"[bold red]error:[/] {escape(str(missing))}", markup=True, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
