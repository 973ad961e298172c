"""`tidal qos ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Node QoS agent: keep online services inside their SLO next to offline work.",
    no_args_is_help=True,
)
