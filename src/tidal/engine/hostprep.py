"""One-time node preparation the runtimes need, done idempotently by the daemon.

crun 1.8 refuses to run on a cgroup v1/v2 hybrid whose v2 hierarchy still offers controllers
("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"). A controller that
no v2 cgroup uses can be bound to a v1 hierarchy instead, which empties the v2 side; that is
what :func:`prepare_hybrid_cgroups` does (e.g. ``hugetlb`` on Debian kernels booted hybrid).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tidal import proc
from tidal.cgroups import CGROUP_ROOT
from tidal.errors import OciRuntimeError

log = logging.getLogger(__name__)


def v2_controllers_in_hybrid(root: Path = CGROUP_ROOT) -> list[str]:
    """Controllers offered by the v2 part of a hybrid hierarchy (empty on pure v1 or v2)."""
    unified = root / "unified" / "cgroup.controllers"
    if not unified.exists():
        return []
    return unified.read_text().split()


def prepare_hybrid_cgroups(root: Path = CGROUP_ROOT) -> list[str]:
    """Move each v2 controller of a hybrid to its own v1 hierarchy; returns the ones moved."""
    moved = []
    for ctrl in v2_controllers_in_hybrid(root):
        target = root / ctrl
        target.mkdir(exist_ok=True)
        proc.run(
            ["mount", "-t", "cgroup", "-o", ctrl, "cgroup", str(target)],
            what=(
                f"crun needs the cgroup v2 side of this hybrid host empty (else use --runtime "
                f"runc), but mounting controller {ctrl!r} as v1 at {target} failed"
            ),
            error=OciRuntimeError,
            timeout_s=30,
        )
        log.info("mounted cgroup v1 controller %s at %s so crun accepts the hybrid", ctrl, target)
        moved.append(ctrl)
    return moved
