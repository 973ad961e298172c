"""``tidal virtual-node`` as a command: against the fake API server through a kubeconfig, with
the real daemon's socket; SIGTERM ends it cleanly; a bad kubeconfig is one line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instance.conftest import busybox_rootfs, engine_settings, instance_daemon, instance_settings
from tidal.engine.daemon import Daemon
from tidal.engine.settings import EngineSettings
from tidal.instance.client import InstanceClient
from tidal.testing.daemon import daemon_env
from tidal.testing.fake_kube import FakeKube

__all__ = ["busybox_rootfs", "engine_settings", "instance_daemon", "instance_settings"]
TIDAL = [sys.executable, "-m", "tidal.cli.main"]


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "vn", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "vn"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.mark.root
@pytest.mark.runtime
@pytest.mark.cgroups
@pytest.mark.netns
def test_the_command_registers_the_node_keeps_the_lease_and_stops_on_sigterm(
    fake_kube: FakeKube,
    instance_daemon: tuple[Daemon, InstanceClient],
    engine_settings: EngineSettings,
    tmp_path: Path,
) -> None:
    env = daemon_env(engine_settings) | {
        "TIDAL_ENGINE__SOCKET_PATH": str(engine_settings.resolved_socket_path())
    }
    proc = subprocess.Popen(
        [
            *TIDAL,
            "virtual-node",
            "--kubeconfig",
            str(_kubeconfig(tmp_path, fake_kube.url)),
            "--node-name",
            "vn-cli",
            "--region",
            "cloud-b",
            "--node-ip",
            "10.1.2.3",
            "--lease-interval",
            "0.3",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # created, then renewed by a patch
        renewed = fake_kube.wait_for(
            lambda k: any(r.method == "PATCH" and "/leases/vn-cli" in r.path for r in k.requests),
            60,
        )
        assert renewed, f"no lease renewal; exit status {proc.poll()}"
        node = fake_kube.get("nodes", "vn-cli")
        assert node is not None
        assert node["metadata"]["labels"]["topology.kubernetes.io/region"] == "cloud-b"
        assert {"type": "InternalIP", "address": "10.1.2.3"} in node["status"]["addresses"]
        assert (
            next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["status"]
            == "True"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def test_a_bad_kubeconfig_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    proc = subprocess.run(
        [*TIDAL, "virtual-node", "--kubeconfig", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot load kubeconfig {bad}"), (
        proc.stderr
    )
