"""Kubernetes resource quantities and requests as :class:`~tidal.sched.model.Resources`.

Parsing is the kubernetes client's own (``kubernetes.utils.quantity.parse_quantity``), so
``500m``, ``4Gi``, ``1e3`` and ``0.5`` mean exactly what the API server means by them; it is
imported when first used (the client is heavy and an optional extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tidal.errors import ConfigError
from tidal.sched.model import Resources

GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource name GPU pods request (the NVIDIA device plugin's)."""
TERMINAL_PHASES = ("Succeeded", "Failed")
"""Pods in these phases hold no resources on their node."""


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity as a plain number; anything else is one clear error."""
    from kubernetes.utils.quantity import parse_quantity as k8s_parse_quantity

    try:
        return float(k8s_parse_quantity(text))
    except (ValueError, TypeError, ArithmeticError):
        raise ConfigError(f"not a Kubernetes quantity: {text!r}") from None


def resources_of(amounts: Mapping[str, Any]) -> Resources:
    """``cpu``, ``memory`` and ``nvidia.com/gpu`` of a requests or allocatable map."""
    return Resources(
        round(parse_quantity(amounts.get("cpu", 0)) * 1000),
        round(parse_quantity(amounts.get("memory", 0)) / 2**20),
        round(parse_quantity(amounts.get(GPU_RESOURCE, 0))),
    )


def pod_requests(pod: Mapping[str, Any]) -> Resources:
    """What the scheduler reserves for a pod: the sum of its containers' requests, or its
    largest init container's if that is more (per resource), as kube-scheduler counts."""
    spec = pod.get("spec") or {}
    total = Resources()
    for c in spec.get("containers") or []:
        total = total + resources_of((c.get("resources") or {}).get("requests") or {})
    for c in spec.get("initContainers") or []:
        init = resources_of((c.get("resources") or {}).get("requests") or {})
        total = Resources(
            max(total.cpu_milli, init.cpu_milli),
            max(total.memory_mib, init.memory_mib),
            max(total.gpu, init.gpu),
        )
    return total


def holds_resources(pod: Mapping[str, Any]) -> bool:
    """Bound to a node, not finished and not being deleted."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    node = (pod.get("spec") or {}).get("nodeName")
    return bool(node) and phase not in TERMINAL_PHASES and not meta.get("deletionTimestamp")
