"""The pod sandbox's rootfs: a directory holding one static ``pause`` binary.

The sandbox (infra) container only holds the pod's network, IPC and UTS namespaces, so its
rootfs is as small as a rootfs gets: ``pause.c`` next to this module, compiled once with the
host's gcc (cached by source hash, like the rich-mode init) into ``<dir>/rootfs-<hash>/pause``.
It needs no image, no quota volume and no mount: the sandbox's root is this directory itself,
read-only (``ContainerSpec.read_only_rootfs``), so a sandbox adds no overlay to the node's
mount table (which every new mount namespace copies and the runtime reads several times per
start). The directories the runtime mounts over are made here, so it never writes into it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from tidal import proc
from tidal.errors import InstanceError

SOURCE = Path(__file__).with_name("pause.c")
PAUSE_PATH = "/pause"
"""The sandbox's command inside its rootfs."""
_BUILD_LOCK = threading.Lock()
"""One build per process: a batch's first instances ask for the rootfs at once (their
threads shared one temporary directory and removed it under each other)."""


def pause_rootfs(cache_dir: Path) -> Path:
    """The sandbox rootfs for the current source, building the binary if needed."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    rootfs = cache_dir / f"pause-rootfs-{digest}"
    if (rootfs / "pause").exists():
        return rootfs
    with _BUILD_LOCK:
        if (rootfs / "pause").exists():
            return rootfs
        return _build(cache_dir, rootfs)


def _build(cache_dir: Path, rootfs: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise InstanceError(
            "an instance's sandbox needs its pause process built once with a C compiler: "
            f"apt-get install gcc libc6-dev, or place a static build of {SOURCE.name} at "
            f"{rootfs}/pause"
        )
    # per thread, not per process: the pools' refill thread may build it beside a create
    tmp = cache_dir / f"pause-rootfs.tmp{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    done = proc.run(
        [cc, "-static", "-Os", "-Wall", "-o", str(tmp / "pause"), str(SOURCE)],
        what="building the sandbox's pause process",
        error=InstanceError,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InstanceError(f"building the pause process failed: {done.stderr.strip()[-1500:]}")
    for d in ("proc", "dev", "sys", "etc"):
        (tmp / d).mkdir()
    try:
        os.rename(tmp, rootfs)
    except OSError:  # another daemon thread built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return rootfs
