"""Shared rich consoles: results go to stdout, progress and diagnostics to stderr.

Lines are never wrapped (``soft_wrap``): a digest or a path split over two lines breaks
copy-paste and grep. Off a terminal (pipes, CI logs) tables get 160 columns unless
``COLUMNS`` says otherwise, instead of rich's 80.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from tidal.engine.runtime import ExecResult


def _width(stream: object) -> int | None:
    if os.environ.get("COLUMNS") or getattr(stream, "isatty", lambda: False)():
        return None  # rich asks the terminal / COLUMNS
    return 160


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def command_argv(command: list[str] | None) -> tuple[str, ...]:
    """The command after ``--`` (click keeps the separator when interspersed args are off)."""
    items = list(command or ())
    if items and items[0] == "--":
        items = items[1:]
    return tuple(items)


def stdin_bytes() -> bytes:
    """What an ``exec`` passes on: piped stdin, or nothing from a terminal."""
    return b"" if sys.stdin.isatty() else sys.stdin.buffer.read()


def write_exec_result(res: ExecResult) -> int:
    """An exec's output, unchanged, on our stdout and stderr; returns its exit status."""
    sys.stdout.buffer.write(res.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(res.stderr)
    sys.stderr.buffer.flush()
    return res.exit_code
