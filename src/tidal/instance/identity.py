"""Who an instance is in Kubernetes' terms: the pod, namespace and uid its metrics and logs
carry.

The virtual node sets the pod's identity as instance labels (``io.kubernetes.pod.name``,
``io.kubernetes.pod.namespace``, ``io.kubernetes.pod.uid``, the kubelet's own label names);
an instance run by hand has none, and is then pod ``<instance name>`` in namespace ``tidal``
with its id, in the UUID form, as uid. Each member container's name is its member name
(``main`` for the first, unless :data:`LABEL_MAIN_CONTAINER` names it). Pure: used by the cAdvisor collector and the CRI log layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tidal.engine.crilog import CriLogSpec
from tidal.instance.catalog import InstanceSettings
from tidal.instance.spec import MAIN
from tidal.instance.store import InstanceRecord

LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_MAIN_CONTAINER = "io.kubernetes.container.main"
"""The pod's first container's Kubernetes name (the virtual node sets it): the instance
calls that container ``main``, its metrics and logs use this name."""
DEFAULT_NAMESPACE = "tidal"
SANDBOX_CONTAINER = "POD"
"""cAdvisor's (and the kubelet's) ``container`` label of a pod's sandbox."""


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod: str
    uid: str

    @classmethod
    def of(cls, rec: InstanceRecord) -> PodIdentity:
        labels = dict(rec.spec.labels)
        iid = rec.id
        uid = (
            f"{iid[:8]}-{iid[8:12]}-{iid[12:16]}-{iid[16:20]}-{iid[20:32]}"
            if len(iid) == 32
            else iid
        )
        return cls(
            namespace=labels.get(LABEL_POD_NAMESPACE) or DEFAULT_NAMESPACE,
            pod=labels.get(LABEL_POD_NAME) or rec.name,
            uid=labels.get(LABEL_POD_UID) or uid,
        )

    @property
    def log_dir_name(self) -> str:
        """``<namespace>_<pod>_<uid>``, the kubelet's pod log directory."""
        return f"{self.namespace}_{self.pod}_{self.uid}"


def container_name(rec: InstanceRecord, member: str) -> str:
    """Member ``member``'s name in Kubernetes' terms: its own, or for ``main`` the name of
    the pod's first container when the virtual node recorded it."""
    if member == MAIN:
        return dict(rec.spec.labels).get(LABEL_MAIN_CONTAINER) or member
    return member


def cri_log_spec(
    rec: InstanceRecord, container: str, settings: InstanceSettings
) -> CriLogSpec | None:
    """Where member ``container`` of ``rec`` logs in the kubelet's layout (None: off)."""
    if not settings.pod_log_dir:
        return None
    container = container_name(rec, container)
    who = PodIdentity.of(rec)
    return CriLogSpec(
        directory=os.path.join(settings.pod_log_dir, who.log_dir_name, container),
        link_dir=settings.container_log_dir,
        link_stem=f"{who.pod}_{who.namespace}_{container}",
    )
