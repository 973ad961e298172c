import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.loop
@pytest.mark.netns
@pytest.mark.registry
def test_demo_runs_an_instance_by_reference_at_its_shaped_rate_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "TIDAL_DATA_ROOT": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "demo", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the table wraps long cells
    assert "hello from a Tidal instance" in text
    assert "metadata pulled, image mounted lazily" in text
    assert "chunks ok (sha256)" in text
    rate = re.search(r"(\d+\.\d+) Mbit/s \(limit 5\); bytes identical", text)
    assert rate is not None, proc.stdout
    assert 3.0 < float(rate.group(1)) < 6.0, rate.group(0)
    # the lazy mount fetched only what the instance read: a fraction of the image
    fetched = re.search(r"stored \((\d+) %\): only the blocks it read", text)
    assert fetched is not None, proc.stdout
    assert 0 < int(fetched.group(1)) < 50
    # other tests may hold loop devices at the same time: look only for ours
    assert (
        str(tmp_path)
        not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    )
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "tidaldemo0" not in links
    assert not list((tmp_path / "w" / "node" / "engine" / "containers").glob("*/"))


def test_cli_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "image", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "nope" in proc.stderr


def test_error_text_is_printed_verbatim_not_as_markup(tmp_path: Path) -> None:
    """Messages name settings as ``[engine] ...``; rich must not eat them as markup tags."""
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli.main", "ps"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TIDAL_ENGINE__RUNTIME": "[bold]nope", "TIDAL_DATA_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: [engine] runtime '[bold]nope': choose one of runc, crun" in proc.stderr


def test_cli_start_imports_no_heavy_part() -> None:
    """`tidal ps` must start fast: numpy, FUSE, the registry client and the Kubernetes client
    are imported by the commands that use them, not by the CLI's entry point."""
    code = (
        "import sys, tidal.cli.main\n"
        "heavy = ['numpy', 'tidal.blockdev.fuse_ll', 'grpc', 'kubernetes', 'tidal.blobs.distribution',\n"
        "         'tidal.blockdev.mounts', 'tidal.sched.simulator', 'matplotlib']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "", f"imported at CLI start: {proc.stdout.strip()}"
