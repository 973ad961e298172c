"""``[sched]`` settings: prices, latencies and the Kubernetes names the scheduler uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidal.config import data_root, load_section
from tidal.validation import Fraction, NonNegativeFloat, Port, PositiveFloat, PositiveInt, check

DEFAULT_PRICE_RATIO = 1.5
"""Serverless costs 1.5x owned capacity per hour in the write-up."""
DEFAULT_CREATION_LATENCY_S = 60.0
"""From request to a ready virtual pod, image included; rounds to the simulator's minute."""
DEFAULT_CEILING = 0.6
"""Owned servers ran about 60 % at peak in the write-up; more risks the online SLO."""
DEFAULT_EXTENDER_PORT = 8888
POLICIES = (
    "all-owned",
    "naive-overflow",
    "reactive-reserve",
    "cluster-autoscaler",
    "tidal",
    "oracle",
)
"""The policies the simulator compares (here, not in the simulator: the CLI's help needs them
without importing numpy)."""
DEFAULT_LOAD_SCALE = 20.0
"""Request traces: busy workers per minute times this are the replica demand (the GenAI trace
is a sample of about 0.4 busy workers; x20 gives services of tens of replicas)."""
SERVICE_LABEL = "tidal.io/service"
"""Pod/Deployment label naming the service whose threshold applies."""
ENABLED_LABEL = "tidal.io/hybrid"
"""Deployments with ``tidal.io/hybrid=enabled`` are managed by the controller."""
THRESHOLD_ANNOTATION = "tidal.io/owned-threshold"
"""Set by an operator on a Deployment: a manual threshold that overrides the prediction."""
PREDICTED_ANNOTATION = "tidal.io/predicted-threshold"
"""Written by the controller: the threshold the extender applies."""
NODE_KIND_LABEL = "tidal.io/node-kind"
"""``virtual`` on virtual-kubelet nodes (``type=virtual-kubelet`` is recognised too)."""
SITE_LABEL = "topology.kubernetes.io/region"


@dataclass(frozen=True)
class SchedSettings:
    price_ratio: PositiveFloat = DEFAULT_PRICE_RATIO
    creation_latency_s: NonNegativeFloat = DEFAULT_CREATION_LATENCY_S
    ceiling: Fraction = DEFAULT_CEILING
    train_days: PositiveInt = 7
    extender_host: str = "127.0.0.1"
    extender_port: Port = DEFAULT_EXTENDER_PORT
    resync_interval_s: PositiveFloat = 30.0
    """How often the controller re-reconciles everything even without watch events."""
    state_dir: Path | None = None
    """Controller state (replica histories); ``None`` means ``$TIDAL_DATA_ROOT/sched``."""

    def __post_init__(self) -> None:
        check(self, "[sched]")

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else data_root() / "sched"


def load_settings(path: Path | None = None) -> SchedSettings:
    return load_section("sched", SchedSettings, path)
