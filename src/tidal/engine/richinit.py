"""Build (once) and place the rich-mode init, Tidal's own PID 1 for rich containers.

The init is a small static C program (``tidal_init.c`` next to this module) because it runs
inside images that have no Python. It is compiled on first use with the host's gcc and cached
under the engine's state directory by source hash, so an edited source rebuilds and a node
without a compiler can be given a prebuilt binary at the same path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from tidal import proc
from tidal.engine.bundle import init_conf
from tidal.engine.spec import ContainerSpec
from tidal.errors import EngineError
from tidal.fsutil import write_text_atomic

SOURCE = Path(__file__).with_name("tidal_init.c")
STATE_FILE = "state/services"
"""Below the init directory: the init's report of each process (see tidal_init.c)."""
SERVICE_STATES = ("running", "restarting", "exited", "gave-up", "stopped")


@dataclass(frozen=True)
class ServiceState:
    """What the rich-mode init last reported about one of its processes (``main`` included)."""

    name: str
    state: str
    """running | restarting | exited | gave-up (restart limit used up) | stopped."""
    restarts: int
    max_restarts: int
    last_exit: int | None
    """The last exit status as a shell reports it (128+n: signal n); None: not exited yet."""
    pid: int = 0


def parse_service_states(text: str) -> tuple[ServiceState, ...]:
    """The init's state file: ``name state restarts max last_exit|- pid`` per line (tabs).

    A malformed line is skipped: the file is written by a process inside the container."""
    out = []
    for line in text.splitlines():
        f = line.split("\t")
        if len(f) != 6 or f[1] not in SERVICE_STATES:
            continue
        try:
            last = None if f[4] == "-" else int(f[4])
            out.append(ServiceState(f[0], f[1], int(f[2]), int(f[3]), last, int(f[5])))
        except ValueError:
            continue
    return tuple(out)


def read_service_states(init_dir: Path) -> tuple[ServiceState, ...]:
    """The states the init of the container with ``init_dir`` reported (none: not rich)."""
    try:
        return parse_service_states((init_dir / STATE_FILE).read_text(errors="replace"))
    except OSError:
        return ()


def init_binary(cache_dir: Path) -> Path:
    """Path of the compiled init for the current source, building it if needed."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    target = cache_dir / f"tidal-init-{digest}"
    if target.exists():
        return target
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise EngineError(
            "rich mode needs its init built once with a C compiler: apt-get install gcc "
            f"libc6-dev, or place a static build of {SOURCE.name} at {target}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # per thread, not only per process: the members of a pod are created at once, and two
    # builds sharing one temporary file made the second's rename fail
    tmp = target.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    done = proc.run(
        [cc, "-static", "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
        what="building the rich-mode init",
        error=EngineError,
        check=False,
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"building the rich-mode init failed: {done.stderr.strip()[-1500:]}")
    os.replace(tmp, target)
    return target


def prepare_init_dir(
    init_dir: Path, cache_dir: Path, spec: ContainerSpec, main_argv: tuple[str, ...]
) -> Path:
    """Fill ``init_dir`` (bound read-only at /.tidal) with the init and its conf, and an
    empty ``state`` directory (bound writable at /.tidal/state) for this start's report."""
    init_dir.mkdir(parents=True, exist_ok=True)
    state = init_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    binary = init_binary(cache_dir)
    dest = init_dir / "init"
    tmp = init_dir / "init.tmp"
    shutil.copyfile(binary, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    write_text_atomic(init_dir / "init.conf", init_conf(spec, main_argv))
    return init_dir
