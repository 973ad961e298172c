"""A container keeps reading its image while the node service is SIGKILLed and restarted.

The engine mounts the image through the node service (it runs), the container reads a 64 MiB
file from it in 1 MiB steps, the service is killed mid-file and started again: the container
prints the file's right sha256 and exits 0 (a pause, not EIO), and nothing leaks.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image, leaked
from tidal.blockdev import mounts
from tidal.engine.containers import Engine
from tidal.engine.spec import ContainerSpec
from tidal.testing.node import NodeProcess

pytestmark = [pytest.mark.root, pytest.mark.runtime, pytest.mark.cgroups, pytest.mark.loop,
              pytest.mark.fuse]  # fmt: skip

SIZE_MIB = 64


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeProcess]:
    """Requested before ``engine``: the engine's mounts then share the node's data root."""
    data_root = tmp_path / "node-data"
    monkeypatch.setenv("TIDAL_DATA_ROOT", str(data_root))
    n = NodeProcess(data_root).start()
    try:
        yield n
    finally:
        names = n.close()
        assert not names, f"the fd store still held {names}"


def test_a_container_reads_through_a_node_service_restart(
    node: NodeProcess, engine: Engine, tmp_path: Path
) -> None:
    big = os.urandom(SIZE_MIB << 20)
    image = build_sample_image(tmp_path / "img", {"data/big.bin": big})
    script = (
        f"i=0; while [ $i -lt {SIZE_MIB} ]; do "
        "dd if=/data/big.bin bs=1048576 skip=$i count=1 2>/dev/null; usleep 15000; "
        "i=$((i+1)); done | sha256sum"
    )
    rec = engine.run(ContainerSpec(image=str(image), command=("sh", "-c", script)))
    try:
        served = [m for m in mounts.list_mounts() if m.image_dir == str(image)]
        assert served and served[0].server_pid == node.pid, "the engine did not ask the service"
        time.sleep(0.4)
        assert engine.get(rec.id).status == "running", "the read finished before the kill"
        node.kill(signal.SIGKILL)
        time.sleep(0.5)
        assert engine.get(rec.id).status == "running", "the container died with the service"
        node.start()
        rec = engine.wait(rec.id, 120)
        assert rec.status == "exited" and rec.exit_code == 0, (rec, engine.logs(rec.id).data)
        out = engine.logs(rec.id).data.decode().split()
        assert out and out[0] == hashlib.sha256(big).hexdigest()
    finally:
        engine.remove(rec.id, force=True)
    # the image stays hot (the engine's image cache) until released: then its mount goes
    assert [m.server_pid for m in mounts.list_mounts() if m.image_dir == str(image)] == [node.pid]
    engine.storage.trim_hot_images(keep=0)
    assert not [m for m in mounts.list_mounts() if m.image_dir == str(image)]
    # the engine's anchor (its state directory's own mount) is released by its close
    assert not [x for x in leaked(tmp_path) if x != f"mount {engine.state_dir}"]
