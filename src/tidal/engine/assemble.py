"""A container's OCI bundle from its record: command, image config, rich init, lxcfs, mounts.

The pure part is :func:`tidal.engine.bundle.build_config`; this module gathers its inputs from
the places that know them (the image's config, the rich-mode init, the lxcfs supervisor, the
container's volumes and network namespace) and writes ``bundle/config.json``.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from tidal.engine.bundle import (
    BundleInputs,
    Mount,
    bind,
    build_config,
    caps_in_mask,
    rich_args,
    write_bundle,
)
from tidal.engine.richinit import prepare_init_dir
from tidal.engine.rootfs import ImageConfig, provider_for
from tidal.engine.store import ContainerRecord
from tidal.errors import ConfigError


@dataclass(frozen=True)
class HostView:
    """What the bundle takes from the node: lxcfs's files, the netns, the cgroup path."""

    cgroups_path: str
    netns_path: str | None
    lxcfs_proc_dir: str | None = None
    lxcfs_files: tuple[str, ...] = ()
    ipc_ns_path: str | None = None
    """Pod member: the sandbox's IPC and UTS namespaces (``/proc/PID/ns/...``)."""
    uts_ns_path: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    """The runtime's pod annotations."""
    cpus: tuple[int, ...] = ()
    """CPUs a ``--cpus`` container may be pinned to (empty: no pinning)."""


def command_of(rec: ContainerRecord, image_cfg: ImageConfig) -> tuple[str, ...]:
    argv = rec.spec.command or image_cfg.default_command
    if not argv:
        raise ConfigError(
            f"image {rec.spec.image} has no default command; give one: tidal run IMAGE -- CMD"
        )
    return argv


def write_container_bundle(
    rec: ContainerRecord, cdir: Path, init_cache: Path, host: HostView
) -> Path:
    """Write ``cdir/bundle/config.json`` for ``rec``; returns the bundle directory."""
    spec = rec.spec
    layer = rec.rootfs.layer
    if layer is None:
        raise ConfigError(f"container {rec.name} has no root file system; remove and re-create it")
    image_cfg = provider_for(spec.image).image_config(spec.image)
    image_init = spec.rich and spec.rich_mode == "systemd"
    argv = () if image_init else command_of(rec, image_cfg)
    init_dir = None
    if spec.rich:
        if spec.rich_mode == "init":
            init_dir = str(prepare_init_dir(cdir / "init", init_cache, spec, argv))
        argv = rich_args(spec, argv)
    mounts: list[Mount] = [
        bind(state.path, vol.target, readonly=vol.readonly)
        for state, vol in zip(rec.rootfs.volumes, spec.volumes, strict=False)
    ]
    inputs = BundleInputs(
        container_id=rec.id,
        rootfs=layer.merged,
        args=argv,
        cgroups_path=host.cgroups_path,
        netns_path=host.netns_path,
        mounts=tuple(mounts),
        lxcfs_proc_dir=host.lxcfs_proc_dir,
        lxcfs_files=host.lxcfs_files,
        init_dir=init_dir,
        image_env=image_cfg.env,
        image_workdir=image_cfg.workdir,
        nofile_limit=nofile_hard_limit(),
        host_caps=host_bounding_caps(),
        ipc_ns_path=host.ipc_ns_path,
        uts_ns_path=host.uts_ns_path,
        annotations=host.annotations,
        host_cpus=host.cpus,
    )
    bundle_dir = cdir / "bundle"
    write_bundle(bundle_dir, build_config(spec, inputs))
    return bundle_dir


def nofile_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def host_cpus(cgroup_root: Path) -> tuple[int, ...]:
    """The CPUs the engine itself may run on, what a pinned container picks from; empty
    where no cpuset controller is mounted (v1) or enabled at the root (v2)."""
    if not (cgroup_root / "cpuset").is_dir():
        try:
            controllers = (cgroup_root / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        if "cpuset" not in controllers:
            return ()
    return tuple(sorted(os.sched_getaffinity(0)))


def host_bounding_caps() -> frozenset[str] | None:
    """The daemon's capability bounding set (a container cannot get what the host lacks)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                return caps_in_mask(int(line.split()[1], 16))
    except OSError:
        pass
    return None
