"""``[sched]`` settings: prices, latencies and the Kubernetes names the scheduler uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidal.config import check_settings, data_root, load_section
from tidal.errors import ConfigError

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
    price_ratio: float = DEFAULT_PRICE_RATIO
    creation_latency_s: float = DEFAULT_CREATION_LATENCY_S
    ceiling: float = DEFAULT_CEILING
    train_days: int = 7
    extender_host: str = "127.0.0.1"
    extender_port: int = DEFAULT_EXTENDER_PORT
    resync_interval_s: float = 30.0
    """How often the controller re-reconciles everything even without watch events."""
    state_dir: Path | None = None
    """Controller state (replica histories); ``None`` means ``$TIDAL_DATA_ROOT/sched``."""

    def __post_init__(self) -> None:
        check_settings(
            "sched",
            self,
            positive=("price_ratio", "train_days", "resync_interval_s"),
            non_negative=("creation_latency_s",),
            ports=("extender_port",),
        )
        if not 0 < self.ceiling <= 1:
            raise ConfigError(f"[sched] ceiling {self.ceiling} must be a fraction in (0, 1]")

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else data_root() / "sched"


def load_settings(path: Path | None = None) -> SchedSettings:
    return load_section("sched", SchedSettings, path)
