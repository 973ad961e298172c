"""Optional dependency groups (pip extras) and the one line a command prints when one is missing.

A node installs ``tidal`` alone: the engine, block devices, blobs, P2P and the QoS agent need
nothing more. The cluster-side scheduler (simulator, predictor, Kubernetes extender and
controller) needs the ``sched`` extra; the QoS experiment's and the benchmarks' plots the
``bench`` extra. Those modules import their libraries at the top as usual; the CLI turns the
``ModuleNotFoundError`` into :class:`~tidal.errors.MissingExtraError` (one line naming the
extra), and a long command checks with :func:`require_extra` before it starts.
"""

from __future__ import annotations

import importlib

from tidal.errors import MissingExtraError

EXTRAS: dict[str, tuple[str, ...]] = {
    "sched": ("numpy", "kubernetes"),
    "vnode": ("kubernetes",),
    "bench": ("numpy", "matplotlib", "blake3"),
    "snapshotter": ("grpc", "grpc_tools"),
}
"""Extra -> the top-level modules it brings (the same lists as ``pyproject.toml``)."""

DIST_MODULES: dict[str, str] = {"grpcio": "grpc", "grpcio-tools": "grpc_tools"}
"""A distribution's top-level module where the two names differ."""


def _error(module: str, extra: str, needed_by: str | None) -> MissingExtraError:
    who = needed_by or "this command"
    return MissingExtraError(
        f"{who} needs {module}, which is not installed; it comes with Tidal's '{extra}' "
        f"extra: pip install 'tidal[{extra}]'"
    )


def require_extra(extra: str, needed_by: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``modules`` (default: all of ``extra``'s) import."""
    for module in modules or EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _error(module, extra, needed_by) from exc


def missing_extra_error(exc: ImportError) -> MissingExtraError | None:
    """The one-line error for an ``ImportError`` of a module an extra brings, else None."""
    root = (exc.name or "").partition(".")[0]
    for extra, modules in EXTRAS.items():
        if root in modules:
            return _error(root, extra, None)
    return None
