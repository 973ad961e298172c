"""``make test`` fails, not skips, where a capability is missing (TIDAL_REQUIRE_ALL=1).

Each test runs pytest (or make) in a subprocess, so the conftest's two modes are seen from
outside: a tiny test file needing a capability that ``TIDAL_TEST_MISSING`` declares missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TINY = """
import pytest

@pytest.mark.registry
def test_needs_registry():
    pass

def test_skips_at_run_time():
    pytest.skip("needs frobnicate (Debian package frob)")

@pytest.mark.skipif(True, reason="shared data is not here")
def test_declared_skip():
    pass

def test_plain():
    pass
"""


def _run_tiny(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The repository's pytest configuration and tests/conftest.py on the tiny file."""
    test = tmp_path / "test_tiny.py"
    test.write_text(TINY)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDAL_")}
    full_env.update(PYTHONPATH=str(REPO / "tests"), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
         f"--rootdir={tmp_path}", "-p", "conftest", "-p", "no:cacheprovider", "-q", str(test)],
        capture_output=True, text=True, env=full_env, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_missing_capability_skips_with_its_reason_by_default(tmp_path: Path) -> None:
    proc = _run_tiny(tmp_path, TIDAL_TEST_MISSING="registry")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b1 passed, 3 skipped\b", proc.stdout), proc.stdout
    assert "declared missing by TIDAL_TEST_MISSING" in proc.stdout


def test_require_all_turns_capability_and_run_time_skips_into_failures(tmp_path: Path) -> None:
    proc = _run_tiny(tmp_path, TIDAL_TEST_MISSING="registry", TIDAL_REQUIRE_ALL="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # a missing capability fails at set-up (an error), a run-time skip fails its call
    assert re.search(r"\b1 failed, 1 passed, 1 skipped, 1 error\b", proc.stdout), proc.stdout
    assert "ERROR test_tiny.py::test_needs_registry" in proc.stdout
    assert "FAILED test_tiny.py::test_skips_at_run_time" in proc.stdout
    assert "capability missing (registry: declared missing by TIDAL_TEST_MISSING)" in proc.stdout
    assert "which makes it a failure: needs frobnicate (Debian package frob)" in proc.stdout


def test_unknown_capability_name_is_one_clear_error(tmp_path: Path) -> None:
    proc = _run_tiny(tmp_path, TIDAL_TEST_MISSING="regsitry")
    assert proc.returncode != 0
    assert "TIDAL_TEST_MISSING: unknown capability 'regsitry'" in proc.stdout + proc.stderr


def test_make_test_sets_require_all(tmp_path: Path) -> None:
    """``make test`` with stand-in tools in BIN: the pytest it starts sees TIDAL_REQUIRE_ALL=1."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    for tool in ("ruff", "lint-imports", "mypy"):
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "python").write_text('#!/bin/sh\necho "REQUIRE_ALL=$TIDAL_REQUIRE_ALL $*"\n')
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TIDAL_REQUIRE_ALL"}
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "test", f"BIN={tmp_path}",
         "-o", ".make/apt.stamp", "-o", ".make/venv.stamp"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REQUIRE_ALL=1 -m pytest" in proc.stdout


def _apt_packages() -> set[str]:
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^APT_PACKAGES := ((?:.*\\\n)*.*)$", text, re.M)
    assert m, "no APT_PACKAGES in the Makefile"
    return set(m.group(1).replace("\\\n", " ").split())


# Every tool a capability check or a real-component test looks for (tests/conftest.py and the
# tests' own ``pytest.skip("needs ...")``), so that `make deps` on a fresh Debian 12 installs it.
TOOLS = [
    "fusermount3",
    "losetup",
    "docker-registry",
    "runc",
    "crun",
    "ip",
    "tc",
    "skopeo",
    "nsenter",
    "unshare",
    "mkfs.ext4",
    "e2fsck",
    "debugfs",
    "lxcfs",
    "busybox",
    "debootstrap",
    "htpasswd",
    "openssl",
    "gcc",
]


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian system (no dpkg)")
def test_make_deps_installs_the_package_of_every_tool_the_tests_drive() -> None:
    wanted = _apt_packages()
    unlisted = {}
    for tool in TOOLS:
        path = shutil.which(tool)
        if path is None:
            pytest.fail(f"{tool} is not installed: `make deps` should have installed it")
        real = os.path.realpath(path)
        owners: set[str] = set()
        for candidate in {path, real, re.sub(r"^/usr/", "/", path), re.sub(r"^/usr/", "/", real)}:
            proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if proc.returncode == 0:
                owners |= {p.strip() for p in proc.stdout.split(":", 1)[0].split(",")}
        if not owners & wanted:
            unlisted[tool] = sorted(owners)
    assert unlisted == {}, f"tools whose Debian package is not in APT_PACKAGES: {unlisted}"
