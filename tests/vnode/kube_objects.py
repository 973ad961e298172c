"""Pods as a real API server returns them (v1 Pod with the defaults it fills in: pull policy,
termination message, DNS policy, the service-account token volume, tolerations)."""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]
TOKEN_MOUNT = {
    "name": "kube-api-access-7x2lq",
    "readOnly": True,
    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
}


def container(name: str, image: str, **extra: Any) -> Obj:
    c: Obj = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "volumeMounts": [copy.deepcopy(TOKEN_MOUNT)],
    }
    c.update(extra)
    return c


def pod(
    name: str = "web-7d9f-abcde",
    namespace: str = "shop",
    node: str = "tidal-vn",
    containers: list[Obj] | None = None,
    annotations: dict[str, str] | None = None,
    restart: str = "Always",
    uid: str = "4f1c3a52-9b7e-4d0e-8a63-0d6c7e1f9a21",
) -> Obj:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "4711",
            "creationTimestamp": "2026-11-30T10:00:00Z",
            "labels": {"app": "web", "pod-template-hash": "7d9f"},
            "annotations": annotations or {},
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-7x2lq",
                    "projected": {
                        "defaultMode": 420,
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "fieldRef": {
                                                "apiVersion": "v1",
                                                "fieldPath": "metadata.namespace",
                                            },
                                            "path": "namespace",
                                        }
                                    ]
                                }
                            },
                        ],
                    },
                }
            ],
            "containers": containers
            or [
                container(
                    "web",
                    "busybox:1.36",
                    command=["httpd", "-f"],
                    args=["-p", "8080"],
                    env=[{"name": "MODE", "value": "prod"}],
                    ports=[{"containerPort": 8080, "hostPort": 18080, "protocol": "TCP"}],
                    resources={
                        "limits": {"cpu": "500m", "memory": "256Mi"},
                        "requests": {"cpu": "250m", "memory": "128Mi"},
                    },
                )
            ],
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "priority": 0,
            "enableServiceLinks": True,
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    }
