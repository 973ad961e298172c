"""Claims of the docs that no import contract can check: which module runs which tool.

A tool "runs" where its name is the first item of a list or tuple display (an argv) or the
first argument of a call (``proc.run("losetup", ...)``). The README and the docstrings of
``blockdev/loop.py`` say losetup runs nowhere else; this keeps that true.

mkfs.ext4 runs only in ``blockdev/ext4.py``; mount in ``blockdev/ext4.py`` (ext4 files), the
engine's mount-plan executor ``engine/mounter.py`` and host preparation's cgroup v1 mounts
(``engine/hostprep.py``); umount in ``blockdev/ext4.py`` and lxcfs' lazy unmount of a dead
daemon (``engine/lxcfs.py``), as the README says. Child processes start only in ``tidal.proc`` (and the test harnesses).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

RUN_ONLY_IN = {
    "losetup": {"tidal/blockdev/loop.py"},
    "mkfs.ext4": {"tidal/blockdev/ext4.py"},
    "mount": {"tidal/blockdev/ext4.py", "tidal/engine/mounter.py", "tidal/engine/hostprep.py"},
    # the engine's mount plans and a pod's namespace files are unmounted by umount2(2)
    "umount": {"tidal/blockdev/ext4.py", "tidal/engine/lxcfs.py"},
}

SPAWNERS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
"""The ``subprocess`` functions that start a child."""


def child_starters(root: Path = SRC) -> set[str]:
    """Files (relative to ``root``) that call ``subprocess.<spawner>`` or ``os.system``."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and (
                (owner.id == "subprocess" and node.func.attr in SPAWNERS)
                or (owner.id == "os" and node.func.attr in {"system", "popen"})
            ):
                found.add(rel)
    return found


def test_children_start_only_in_proc() -> None:
    starters = child_starters()
    outside = {f for f in starters if f != "tidal/proc.py" and not f.startswith("tidal/testing/")}
    assert not outside, f"these start children without tidal.proc: {sorted(outside)}"
    assert "tidal/proc.py" in starters, "the scanner no longer sees tidal.proc's own calls"


def test_the_child_scanner_sees_calls(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("subprocess.Popen(['x'])\nsubprocess.DEVNULL\n")
    (tmp_path / "b.py").write_text("p: subprocess.Popen[bytes]\nos.system('true')\n")
    (tmp_path / "c.py").write_text("import subprocess\nx = subprocess.PIPE\n")
    assert child_starters(tmp_path) == {"a.py", "b.py"}


def _is_lookup(call: ast.Call) -> bool:
    """``shutil.which("mount")`` looks a tool up; it does not run it."""
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "which") or (
        isinstance(func, ast.Name) and func.id == "which"
    )


def tool_runners(root: Path = SRC) -> dict[str, set[str]]:
    """Tool name -> files (relative to ``root``) that put it first in an argv or a call."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            first: ast.expr | None = None
            if isinstance(node, ast.List | ast.Tuple) and node.elts:
                first = node.elts[0]
            elif isinstance(node, ast.Call) and node.args and not _is_lookup(node):
                first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.setdefault(first.value, set()).add(rel)
    return found


def test_each_tool_runs_only_where_the_docs_say() -> None:
    runners = tool_runners()
    for tool, allowed in RUN_ONLY_IN.items():
        assert runners.get(tool, set()) <= allowed, f"{tool} also runs in {runners[tool] - allowed}"
        assert runners.get(tool), f"{tool} runs nowhere: the claim is stale"


def test_the_scanner_sees_argvs_and_calls(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(
        'subprocess.run(["losetup", "-f"])\nx = {"type": "mount"}\nshutil.which("mount")\n'
    )
    (tmp_path / "b.py").write_text('proc.run("mkfs.ext4", "-q", dev)\n')
    found = tool_runners(tmp_path)
    assert found["losetup"] == {"a.py"} and found["mkfs.ext4"] == {"b.py"}
    assert "mount" not in found  # neither a dict value nor a lookup is an argv


# --- what a client command loads ------------------------------------------------------------

CLIENT_MUST_NOT_LOAD = (
    "tidal.engine.rootfs",
    "tidal.engine.volume",
    "tidal.engine.mounter",
    "tidal.engine.runtime",
    "tidal.engine.containers",
    "tidal.blockdev.ext4",
    "tidal.blockdev.mounts",
    "tidal.service.server",
    "tidal.image.zfile",
    "tidal.image.manifest",
    "tidal.instance.spec",
    "tidal.blobs.registry_client",
    "lz4.block",
)
"""Planners, host adapters and the server: each ``tidal`` command is a fresh process, so what
``tidal ps`` imports is paid on every call (benchmarks/bench_cli.py measures it)."""


def _loaded_after(code: str) -> set[str]:
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_ps_loads_records_not_planners() -> None:
    """The CLI plus the engine client and a record read from JSON: state data only."""
    loaded = _loaded_after(
        "import tidal.cli.main\n"
        "from tidal.engine.client import EngineClient\n"
        "from tidal.engine.store import ContainerRecord\n"
    )
    assert "tidal.engine.state" in loaded  # the probe really loaded the record types
    assert not loaded & set(CLIENT_MUST_NOT_LOAD), sorted(loaded & set(CLIENT_MUST_NOT_LOAD))


def test_the_load_probe_sees_planners() -> None:
    assert "tidal.engine.rootfs" in _loaded_after("import tidal.engine.storage")
