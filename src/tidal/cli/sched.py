"""`tidal sched ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Hybrid scheduler: simulate policies, run the Kubernetes extender and controller.",
    no_args_is_help=True,
)
