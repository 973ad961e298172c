"""Spec fallback for stock shortage: pure capacity arithmetic and the choice.

A node's free capacity is its capacity (CPUs, memory) minus what its live instances reserve
(their chosen limits). ``--spec 2c2g,2c4g,4c8g`` takes the first type whose CPUs and memory fit
in what is free; when none does, :class:`NoCapacityError` names for each what is short. No I/O
here: the manager reads the node and the records and calls :func:`choose`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tidal.errors import NoCapacityError
from tidal.instance.spec import InstanceType, Limits
from tidal.units import format_size


@dataclass(frozen=True)
class Capacity:
    """CPUs (cores) and memory (bytes)."""

    cpus: float
    memory_bytes: int

    def minus(self, other: Capacity) -> Capacity:
        return Capacity(self.cpus - other.cpus, self.memory_bytes - other.memory_bytes)

    @staticmethod
    def of(limits: Limits) -> Capacity:
        """What an instance with these limits reserves (an unlimited dimension reserves 0)."""
        return Capacity(limits.cpus or 0.0, limits.memory_bytes or 0)

    @staticmethod
    def total(items: Iterable[Capacity]) -> Capacity:
        cpus, mem = 0.0, 0
        for c in items:
            cpus += c.cpus
            mem += c.memory_bytes
        return Capacity(cpus, mem)


EPS = 1e-9


def shortfall(need: Capacity, free: Capacity) -> list[str]:
    """What ``need`` lacks in ``free``, in words (empty: it fits)."""
    short = []
    if need.cpus > free.cpus + EPS:
        short.append(f"{need.cpus:g} CPUs (free {max(free.cpus, 0):g})")
    if need.memory_bytes > free.memory_bytes:
        short.append(
            f"{format_size(need.memory_bytes)} memory (free {format_size(max(free.memory_bytes, 0))})"
        )
    return short


@dataclass(frozen=True)
class Choice:
    """The type taken (None: an instance with ad-hoc limits only) and its final limits."""

    type: InstanceType | None
    limits: Limits


def choose(
    candidates: list[InstanceType],
    adhoc: Limits,
    capacity: Capacity,
    reserved: Capacity,
) -> Choice:
    """The first candidate (with the ad-hoc values laid over it) that fits the free capacity."""
    free = capacity.minus(reserved)
    if not candidates:
        short = shortfall(Capacity.of(adhoc), free)
        if short:
            raise NoCapacityError(
                f"the node cannot hold the instance: it needs {' and '.join(short)}"
            )
        return Choice(None, adhoc)
    reasons = []
    for cand in candidates:
        limits = adhoc.over(cand.limits)
        short = shortfall(Capacity.of(limits), free)
        if not short:
            return Choice(cand, limits)
        reasons.append(f"{cand.name} needs {' and '.join(short)}")
    raise NoCapacityError("no instance spec fits the node's free capacity: " + "; ".join(reasons))
