"""A node runs without the extras: no numpy, matplotlib or kubernetes client.

Each check runs in a subprocess whose ``sitecustomize`` puts a meta-path blocker in front of
every finder, so ``import numpy`` (or matplotlib, kubernetes) fails there as it would on a node
that installed ``tidal`` alone. Node modules must import and node commands must run; the
cluster-side commands must say in one line which extra to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = ("numpy", "matplotlib", "kubernetes")
NODE_PACKAGES = ("tidal.image", "tidal.blobs", "tidal.blockdev", "tidal.engine", "tidal.qos")

SITECUSTOMIZE = """
import os
import sys

BLOCKED = tuple(os.environ["TIDAL_TEST_BLOCKED"].split(","))


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


@pytest.fixture
def node_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "tidal.toml").write_text("")  # the embedded defaults, not the machine's file
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(site),
        TIDAL_TEST_BLOCKED=",".join(BLOCKED),
        TIDAL_DATA_ROOT=str(tmp_path / "data"),
        TIDAL_CONFIG=str(tmp_path / "tidal.toml"),
        COLUMNS="200",
    )
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def _tidal(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run([str(Path(sys.executable).with_name("tidal")), *args], env)


def test_the_blocker_blocks(node_env: dict[str, str]) -> None:
    for name in BLOCKED:
        proc = _run([sys.executable, "-c", f"import {name}"], node_env)
        assert proc.returncode == 1 and "blocked by the test" in proc.stderr, (name, proc.stderr)


def test_every_node_module_imports_without_the_extras(node_env: dict[str, str]) -> None:
    code = f"""
import importlib, pkgutil, sys
import tidal
names = ["tidal.cli.main", "tidal.cgroups", "tidal.config", "tidal.proc", "tidal.extras"]
for pkg in {NODE_PACKAGES!r}:
    mod = importlib.import_module(pkg)
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r})
assert not leaked, leaked
print(len(names), "modules")
"""
    proc = _run([sys.executable, "-c", code], node_env)
    assert proc.returncode == 0, proc.stderr
    count = int(proc.stdout.split()[0])
    assert count > 60, proc.stdout  # every module of the node packages was walked


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["daemon", "--help"],
        ["image", "--help"],
        ["image", "mounts"],
        ["image", "mount", "--help"],
        ["demo", "--help"],
        ["qos", "rules", "example"],
        ["qos", "agent", "--help"],
        ["p2p", "--help"],
        ["sched", "--help"],
    ],
    ids=" ".join,
)
def test_node_commands_run_without_the_extras(args: list[str], node_env: dict[str, str]) -> None:
    proc = _tidal(*args, env=node_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_ps_without_a_daemon_is_one_line_not_an_import_error(node_env: dict[str, str]) -> None:
    proc = _tidal("ps", env=node_env)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: the engine daemon is not reachable"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "extra", "module"),
    [
        (["sched", "simulate", "--days", "8"], "sched", "numpy"),
        (["sched", "cordon", "--site", "cloud-a"], "sched", "numpy"),
        (["qos", "experiment", "--duration", "10"], "bench", "matplotlib"),
        (["virtual-node", "--node-name", "vn-1"], "vnode", "kubernetes"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_cluster_commands_name_the_extra_in_one_line(
    args: list[str], extra: str, module: str, node_env: dict[str, str]
) -> None:
    proc = _tidal(*args, env=node_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ")
    assert f"needs {module}" in lines[0] and f"pip install 'tidal[{extra}]'" in lines[0], lines


def test_controller_with_numpy_but_no_kubernetes_names_the_extra(node_env: dict[str, str]) -> None:
    proc = _tidal(
        "sched", "controller", "--once", env={**node_env, "TIDAL_TEST_BLOCKED": "kubernetes"}
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "error: this command needs kubernetes, which is not installed; it comes with Tidal's "
        "'sched' extra: pip install 'tidal[sched]'"
    )
