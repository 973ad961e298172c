"""Bin-packing of replica counts onto identical owned nodes: first-fit decreasing on counts.

Owned nodes are sized by the replicas they must hold at once. The algorithm is first-fit
decreasing (largest pods first, each to the first node with room, a new node when none has):
it is within 11/9 of the optimum plus a constant for one resource, simple enough to explain,
and it is what :func:`tidal.sched.placement.place` does online (first fit over nodes fullest
first), so the simulator sizes nodes the way the scheduler fills them.

It works on *counts* of identical pods, not on pods: nodes in the same state (same free
capacity) are one entry, and ``n`` identical pods fill a run of such nodes in one step. A
packing costs O(shapes x node states), independent of the number of pods, which is what lets
the simulator pack every candidate minute.
"""

from __future__ import annotations

from collections.abc import Sequence

from tidal.errors import ConfigError
from tidal.sched.model import Resources


def fits(free: Resources, req: Resources) -> int:
    """How many pods requesting ``req`` fit into ``free``."""
    counts = []
    for have, want in (
        (free.cpu_milli, req.cpu_milli),
        (free.memory_mib, req.memory_mib),
        (free.gpu, req.gpu),
    ):
        if want > 0:
            counts.append(have // want)
    return max(0, min(counts)) if counts else 0


def share(node: Resources, req: Resources) -> float:
    """The share of an empty node one pod takes when the node is filled with that shape only
    (1 / pods per node): the unit fleet sizing counts in."""
    k = fits(node, req)
    if k == 0:
        raise ConfigError(f"a pod requesting {req} does not fit an owned node of {node} at all")
    return 1.0 / k


def _size_key(node: Resources, req: Resources) -> float:
    parts = [
        req.cpu_milli / node.cpu_milli if node.cpu_milli else 0.0,
        req.memory_mib / node.memory_mib if node.memory_mib else 0.0,
        req.gpu / node.gpu if node.gpu else 0.0,
    ]
    return max(parts)


def ffd_nodes(items: Sequence[tuple[Resources, int]], node: Resources) -> int:
    """Nodes of allocatable ``node`` that first-fit decreasing needs for ``items`` (shape,
    count)."""
    states: list[list[object]] = []  # [free Resources, node count], in node order
    order = sorted((it for it in items if it[1] > 0), key=lambda it: -_size_key(node, it[0]))
    for req, count in order:
        n = int(count)
        i = 0
        while n > 0 and i < len(states):
            free, nodes = states[i]
            assert isinstance(free, Resources) and isinstance(nodes, int)
            k = fits(free, req)
            if k == 0:
                i += 1
                continue
            if n >= k * nodes:
                states[i][0] = Resources(
                    free.cpu_milli - k * req.cpu_milli,
                    free.memory_mib - k * req.memory_mib,
                    free.gpu - k * req.gpu,
                )
                n -= k * nodes
                i += 1
                continue
            full, rem = divmod(n, k)
            taken = Resources(
                free.cpu_milli - k * req.cpu_milli,
                free.memory_mib - k * req.memory_mib,
                free.gpu - k * req.gpu,
            )
            split: list[list[object]] = []
            if full:
                split.append([taken, full])
            if rem:
                split.append(
                    [
                        Resources(
                            free.cpu_milli - rem * req.cpu_milli,
                            free.memory_mib - rem * req.memory_mib,
                            free.gpu - rem * req.gpu,
                        ),
                        1,
                    ]
                )
            left = nodes - full - (1 if rem else 0)
            if left:
                split.append([free, left])
            states[i : i + 1] = split
            n = 0
        if n > 0:
            k = fits(node, req)
            if k == 0:
                raise ConfigError(
                    f"a pod requesting {req} does not fit an owned node of {node} at all"
                )
            full, rem = divmod(n, k)
            if full:
                states.append(
                    [
                        Resources(
                            node.cpu_milli - k * req.cpu_milli,
                            node.memory_mib - k * req.memory_mib,
                            node.gpu - k * req.gpu,
                        ),
                        full,
                    ]
                )
            if rem:
                states.append(
                    [
                        Resources(
                            node.cpu_milli - rem * req.cpu_milli,
                            node.memory_mib - rem * req.memory_mib,
                            node.gpu - rem * req.gpu,
                        ),
                        1,
                    ]
                )
    total = 0
    for _, nodes in states:
        assert isinstance(nodes, int)
        total += nodes
    return total
