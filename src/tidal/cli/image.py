"""`tidal image ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Build, inspect, mount, verify, push and pull Tidal block images.", no_args_is_help=True
)
