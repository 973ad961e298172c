"""What a benchmark or test run left on the host: mounts, loop devices, cgroups, network
namespaces, veths, runtime containers, podman containers, instance and container records,
pod namespace files in the host's namespace holder (:mod:`tidal.engine.podns`).

:func:`find_leaks` looks only inside a :class:`LeakScope` (the run's own directory, cgroup
parents, bridge, netns names, runtime roots, podman name prefix), so other engineers' runs on
the same host are never reported and never touched. It returns one line per leak; the caller
fails loudly on any (``benchmarks/bench_instance_rate.py``). Nothing here cleans up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tidal.engine.podns import NamespaceHolder

CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/var/run/netns")


@dataclass(frozen=True)
class LeakScope:
    """Where one run's resources live (each field optional: ``None``/empty is not looked at)."""

    root: Path | None = None
    """Mounts below it, loop devices whose backing file is below it, and pod namespace files
    in the holder whose owner directory is below it."""
    engine_state: Path | None = None
    """An engine state directory: container records (``state.db``) and instance records."""
    cgroup_parents: tuple[str, ...] = ()
    """Cgroup parents (relative to each hierarchy): any cgroup below one is a leak."""
    netns: tuple[str, ...] = ()
    """Network namespace names (``ip netns``) the run made."""
    bridge: str | None = None
    """A bridge of the run's own: any port (veth) still on it is a leak."""
    runtime_roots: tuple[Path, ...] = ()
    """Runtime ``--root`` state directories: anything left in one is a container the runtime
    still knows (runc and crun: a directory per container; runsc: ``.state``/``.lock`` files)."""
    podman_prefix: str | None = None
    """Podman containers whose name starts with it."""


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [ln.split()[4].replace("\\040", " ") for ln in fh]


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")


def _loop_backings() -> list[tuple[str, str]]:
    out = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not bound to a file
        out.append((dev.name, backing))
    return out


def _cgroups_below(parent: str, cgroup_root: Path) -> list[str]:
    found = []
    hierarchies = [cgroup_root, *(p for p in cgroup_root.iterdir() if p.is_dir())]
    for h in hierarchies if cgroup_root.is_dir() else ():
        base = h / parent.strip("/")
        if base.is_dir():
            found += [str(p) for p in base.rglob("*") if p.is_dir()]
    return sorted(set(found))


def _engine_records(state: Path) -> list[str]:
    out = [f"instance record {p}" for p in sorted((state / "instances" / "records").glob("*.json"))]
    db = state / "state.db"
    if db.exists():
        from tidal.engine.store import Store  # only when there is a database to read

        store = Store(db)
        try:
            out += [f"container record {r.name} ({r.id[:12]})" for r in store.list()]
        finally:
            store.close()
    return out


def _podman_left(prefix: str) -> list[str]:
    if shutil.which("podman") is None:
        return []
    done = subprocess.run(
        ["podman", "ps", "-a", "--format", "json", "--filter", f"name=^{prefix}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        return [f"podman ps failed, podman containers unchecked: {done.stderr.strip()}"]
    items = json.loads(done.stdout or "[]")
    return [f"podman container {(c.get('Names') or ['?'])[0]}" for c in items]


def pod_namespace_leaks(root: Path) -> list[str]:
    """Pods whose namespace files the holder still keeps, of a directory below ``root``."""
    return [
        f"pod namespace files /pods/{key} in the holder, of {owner}"
        for key, owner in sorted(NamespaceHolder().pods().items())
        if _under(str(owner), root)
    ]


def find_leaks(
    scope: LeakScope, *, cgroup_root: Path = CGROUP_ROOT, netns_dir: Path = NETNS_DIR
) -> list[str]:
    """One line per resource of ``scope`` still on the host (empty: nothing left)."""
    leaks: list[str] = []
    if scope.root is not None:
        leaks += [f"mount {m}" for m in _mountpoints() if _under(m, scope.root)]
        leaks += [
            f"loop device /dev/{dev} on {backing}"
            for dev, backing in _loop_backings()
            if _under(backing, scope.root)
        ]
        leaks += pod_namespace_leaks(scope.root)
    if scope.engine_state is not None:
        leaks += _engine_records(scope.engine_state)
    for parent in scope.cgroup_parents:
        leaks += [f"cgroup {c}" for c in _cgroups_below(parent, cgroup_root)]
    held = NamespaceHolder().netns_names() if scope.netns else set()
    leaks += [
        f"network namespace {n}" for n in scope.netns if (netns_dir / n).exists() or n in held
    ]
    if scope.bridge is not None:
        brif = Path("/sys/class/net") / scope.bridge / "brif"
        if brif.is_dir():
            leaks += [f"veth {p.name} on bridge {scope.bridge}" for p in sorted(brif.iterdir())]
    for root in scope.runtime_roots:
        if root.is_dir():
            leaks += [f"runtime container {d.name} in {root}" for d in sorted(root.iterdir())]
    if scope.podman_prefix:
        leaks += _podman_left(scope.podman_prefix)
    return leaks
