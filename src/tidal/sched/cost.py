"""Cost model: owned capacity is paid every hour, virtual pods per minute of use by spec.

The unit is the owned-capacity-hour: what the owned capacity that one replica occupies within
the utilisation ceiling costs for an hour. The write-up prices serverless at 1.5 of that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from tidal.sched.model import Resources

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class CostBreakdown:
    owned: float
    virtual: float

    @property
    def total(self) -> float:
        return self.owned + self.virtual

    def saving_vs(self, baseline: CostBreakdown) -> float:
        """Fraction saved against ``baseline`` (0.225 is the write-up's 22.5 %)."""
        return 1.0 - self.total / baseline.total if baseline.total > 0 else 0.0


def owned_cost(owned_slots: int, minutes: int, price_per_slot_hour: float = 1.0) -> float:
    """Owned capacity costs the same whether it is used or not."""
    return owned_slots * minutes / 60.0 * price_per_slot_hour


def virtual_cost(
    pods_by_spec: Mapping[str, IntArray], price_per_hour: Mapping[str, float]
) -> float:
    """``pods_by_spec``: live virtual pods per minute for each spec; billed per minute."""
    return float(
        sum(pods.sum() * price_per_hour[spec] / 60.0 for spec, pods in pods_by_spec.items())
    )


def slo_violation_minutes(
    demand: FloatArray, capacity: FloatArray, owned_load: FloatArray, owned_limit: FloatArray
) -> int:
    """Minutes in which demand exceeded ready capacity or owned load exceeded the ceiling.

    All arrays are per minute; 2-D arrays (services x minutes) count a minute once however
    many services were short in it.
    """
    short = np.ceil(demand - 1e-9) > capacity + 1e-9
    hot = owned_load > owned_limit + 1e-9
    bad = np.asarray(short | hot)
    if bad.ndim > 1:
        return int(np.asarray(bad.any(axis=0)).sum())
    return int(bad.sum())


@dataclass(frozen=True)
class ResourcePrices:
    """Owned capacity priced per resource, per hour, in owned-capacity-hours.

    The defaults make one 2-CPU / 4 GiB replica cost 1.0 (the unit of every report: 2 x 0.375
    + 4 x 0.0625); a GPU is priced like 10 such replicas (a data-centre GPU rents for roughly
    what 20-30 cores do). Virtual capacity costs ``price_ratio`` times these for the spec
    bought. An owned node costs what its allocatable capacity under the ceiling is worth: the
    rest of the machine is the price of the ceiling.
    """

    cpu_core_hour: float = 0.375
    memory_gib_hour: float = 0.0625
    gpu_hour: float = 10.0

    def of(self, r: Resources) -> float:
        """Price per hour of ``r``."""
        return (
            r.cpu_milli / 1000 * self.cpu_core_hour
            + r.memory_mib / 1024 * self.memory_gib_hour
            + r.gpu * self.gpu_hour
        )
