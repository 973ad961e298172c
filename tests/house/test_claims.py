"""Claims of the docs that no import contract can check: which module runs which tool.

A tool "runs" where its name is the first item of a list or tuple display (an argv) or the
first argument of a call (``proc.run("losetup", ...)``). The README and the docstrings of
``blockdev/loop.py`` say losetup runs nowhere else; this keeps that true.

Not true today, and so not checked here (see the report of issue 11): ``blockdev/ext4.py`` and
the README's "the only places running mkfs.ext4, mount, umount" (engine/volume.py, rootfs.py,
hostprep.py and lxcfs.py run them too). Add the tools to ``RUN_ONLY_IN`` once they are.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

RUN_ONLY_IN = {
    "losetup": {"tidal/blockdev/loop.py"},
}


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
