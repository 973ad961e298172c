"""Shared rich consoles: results go to stdout, progress and diagnostics to stderr.

Lines are never wrapped (``soft_wrap``): a digest or a path split over two lines breaks
copy-paste and grep. Off a terminal (pipes, CI logs) tables get 160 columns unless
``COLUMNS`` says otherwise, instead of rich's 80.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console


def _width(stream: object) -> int | None:
    if os.environ.get("COLUMNS") or getattr(stream, "isatty", lambda: False)():
        return None  # rich asks the terminal / COLUMNS
    return 160


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))
