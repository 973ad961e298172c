"""The cluster as the scheduler sees it: frozen values only, no I/O.

Owned nodes are paid for whether used or not and may be filled only up to a utilisation
ceiling; virtual node pools (serverless capacity behind a virtual kubelet) are paid per pod and
per use, sell fixed specs whose stock can run out, take a while to create a pod and live in a
cloud/site that can fail as a whole. Policies are functions of a :class:`ClusterSnapshot`.
"""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tidal.errors import ConfigError
from tidal.ids import NodeName


class NodeKind(enum.StrEnum):
    """Who pays for the node and how."""

    OWNED = "owned"
    VIRTUAL = "virtual"


_RESOURCES_TEXT = re.compile(
    r"^(?P<cpu>\d+(?:\.\d+)?)c(?P<mem>\d+(?:\.\d+)?)(?P<unit>[gm])(?:(?P<gpu>\d+)gpu)?$"
)


@dataclass(frozen=True, order=True)
class Resources:
    """A request or a capacity: CPU in millicores, memory in MiB, whole GPUs (integers keep
    sums exact)."""

    cpu_milli: int = 0
    memory_mib: int = 0
    gpu: int = 0

    def __post_init__(self) -> None:
        if self.cpu_milli < 0 or self.memory_mib < 0 or self.gpu < 0:
            raise ConfigError(f"resources must not be negative: {self}")

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_milli + other.cpu_milli,
            self.memory_mib + other.memory_mib,
            self.gpu + other.gpu,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_milli - other.cpu_milli,
            self.memory_mib - other.memory_mib,
            self.gpu - other.gpu,
        )

    def fits_in(self, other: Resources) -> bool:
        """True if this request fits into ``other`` on every resource."""
        return (
            self.cpu_milli <= other.cpu_milli
            and self.memory_mib <= other.memory_mib
            and self.gpu <= other.gpu
        )

    def scaled(self, factor: float) -> Resources:
        """CPU and memory rounded down, so a ceiling never lets through more than it says.

        GPUs are whole devices a pod holds alone: no co-located pod contends for them, so the
        utilisation ceiling (a CPU-contention guard) does not apply and they stay as they are.
        """
        return Resources(
            math.floor(self.cpu_milli * factor), math.floor(self.memory_mib * factor), self.gpu
        )

    @classmethod
    def parse(cls, text: str) -> Resources:
        """``"2c4g"`` / ``"0.5c512m"`` / ``"8c32g1gpu"`` shorthand used by spec names and the
        CLI."""
        m = _RESOURCES_TEXT.match(text.strip().lower())
        if m is None:
            raise ConfigError(
                f"cannot parse resources {text!r}; use <cpus>c<memory>g[<gpus>gpu], "
                "e.g. 2c4g, 0.5c512m or 8c32g1gpu"
            )
        mem = float(m["mem"]) * (1024 if m["unit"] == "g" else 1)
        return cls(int(float(m["cpu"]) * 1000), int(mem), int(m["gpu"] or 0))

    def __str__(self) -> str:
        text = f"{self.cpu_milli / 1000:g}c{self.memory_mib / 1024:g}g"
        return f"{text}{self.gpu}gpu" if self.gpu else text


@dataclass(frozen=True)
class OwnedNode:
    """A machine the operator owns; only ``ceiling`` of its capacity may be requested."""

    name: NodeName
    capacity: Resources
    ceiling: float = 0.6
    labels: Mapping[str, str] = field(default_factory=dict)
    cordoned: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ceiling <= 1:
            raise ConfigError(f"node {self.name}: ceiling must be in (0, 1], got {self.ceiling}")

    @property
    def allocatable(self) -> Resources:
        """What may be requested on this node: capacity times the utilisation ceiling."""
        return self.capacity.scaled(self.ceiling)


@dataclass(frozen=True, order=True)
class VirtualSpec:
    """One instance size a virtual pool sells, with its price relative to owned capacity.

    ``price_per_hour`` is in owned-capacity-hours: 1.0 is what the owned capacity that one pod
    of this size occupies costs per hour; the write-up's serverless price is 1.5 of that.
    """

    name: str
    resources: Resources
    price_per_hour: float

    @classmethod
    def of(cls, name: str, price_per_hour: float) -> VirtualSpec:
        return cls(name, Resources.parse(name), price_per_hour)


@dataclass(frozen=True)
class VirtualPool:
    """Serverless capacity in one cloud/site, exposed to Kubernetes as one virtual node.

    ``specs`` is the upgrade path, smallest first (2c2g -> 2c4g -> 4c8g ...); ``stock`` says
    how many pods of each spec can still be bought (missing = unlimited).
    """

    name: str
    node_name: NodeName
    site: str
    specs: tuple[VirtualSpec, ...]
    stock: Mapping[str, int] = field(default_factory=dict)
    creation_latency_s: float = 60.0
    labels: Mapping[str, str] = field(default_factory=dict)
    cordoned: bool = False

    def __post_init__(self) -> None:
        if not self.specs:
            raise ConfigError(f"virtual pool {self.name} declares no specs")
        sizes = [s.resources for s in self.specs]
        for small, big in itertools.pairwise(sizes):
            if not small.fits_in(big):
                raise ConfigError(
                    f"virtual pool {self.name}: spec list must grow monotonically "
                    f"(upgrades never go to a smaller spec); {small} is not within {big}"
                )
        unknown = set(self.stock) - {s.name for s in self.specs}
        if unknown:
            raise ConfigError(
                f"virtual pool {self.name}: stock for unknown specs {sorted(unknown)}"
            )

    def stock_of(self, spec: str) -> int | None:
        """Remaining pods of ``spec``; None means unlimited."""
        return self.stock.get(spec)


@dataclass(frozen=True)
class Pod:
    """A replica of a service, pending (``node`` None) or placed."""

    name: str
    service: str
    requests: Resources
    node: NodeName | None = None
    spec: str | None = None
    """The virtual spec bought for it (None on owned nodes)."""
    created_s: float = 0.0
    """When the pod was created; scale-in removes the newest first."""
    pending_since_s: float | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything a placement decision looks at, frozen at one instant ``now_s``."""

    owned: tuple[OwnedNode, ...]
    pools: tuple[VirtualPool, ...]
    pods: tuple[Pod, ...] = ()
    now_s: float = 0.0
    failed_sites: frozenset[str] = frozenset()

    @cached_property
    def derived(self) -> dict[str, Any]:
        """Indexes computed once per snapshot by the code that reads it (placement keeps its
        node index here), so a second decision on the same snapshot does not redo them."""
        return {}

    @cached_property
    def _pool_by_node(self) -> dict[NodeName, VirtualPool]:
        return {p.node_name: p for p in self.pools}

    @cached_property
    def owned_by_name(self) -> dict[NodeName, OwnedNode]:
        return {n.name: n for n in self.owned}

    def node_kind(self, node: NodeName) -> NodeKind | None:
        if node in self._pool_by_node:
            return NodeKind.VIRTUAL
        if node in self.owned_by_name:
            return NodeKind.OWNED
        return None

    def pool_of(self, node: NodeName) -> VirtualPool | None:
        return self._pool_by_node.get(node)

    def usable(self, pool: VirtualPool) -> bool:
        """A pool takes new pods unless cordoned or its whole site is down."""
        return not pool.cordoned and pool.site not in self.failed_sites
