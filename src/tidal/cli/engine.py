"""Container engine commands (``tidal run``, ``ps``, ``daemon`` ...), registered at top level."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the engine's top-level commands to the main app."""
