"""Instances on the engine: a pod is a sandbox container plus its containers, one cgroup.

:class:`InstanceManager` is what the daemon serves under ``/v1/instances``. ``run`` goes:

1. resolve the spec list, choose the first type the node's free capacity holds, write the
   record (phase ``creating``) — the intent, before anything is made;
2. make the pod's cgroup and write its CPU, memory and pids limits;
3. create the sandbox and, alongside, each container (main, then the others). The sandbox
   is an engine container from the pause rootfs on the bridge network holding the published
   ports, with no quota volume; its create makes everything the pod shares: the named netns
   and, under runc/crun, the pod's IPC and UTS namespaces as files in its directory, the UTS
   one named after the instance (:mod:`tidal.engine.podns`). The containers name it as their
   sandbox and will join those namespaces by path; the pod's ``/etc/hostname`` and
   ``/etc/hosts`` are one file each, bound into every container;
4. start the sandbox as soon as it is made; shape its veth (tc, both directions), write its
   address into ``/etc/hosts``, limit the containers' block devices;
5. start the containers without waiting for the sandbox (runc/crun: nothing they join needs
   its process), or once it runs (runsc: they run inside its gVisor kernel);
6. record the IP and phase ``running``.

A failure at any step undoes what was made (containers by their names, which takes the
sandbox's netns and namespace files along, the cgroup, the record) and raises one error naming
the cause; a daemon killed meanwhile leaves a ``creating`` record that
:meth:`InstanceManager.reconcile` rolls back the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tidal.engine.containers import Engine, LogChunk
from tidal.engine.network import link_names, netns_name
from tidal.engine.runtime import ExecResult
from tidal.engine.spec import ContainerSpec, QuotaSpec, VolumeSpec
from tidal.engine.store import ContainerRecord
from tidal.errors import (
    ConfigError,
    ContainerNotFoundError,
    InstanceError,
    InstanceStateError,
    NoCapacityError,
    TidalError,
)
from tidal.fsutil import write_text_atomic
from tidal.ids import InstanceId
from tidal.instance.capacity import Capacity, choose
from tidal.instance.catalog import Catalog, InstanceSettings, load_instance_settings
from tidal.instance.limits import PodCgroup, apply_net, block_device_of
from tidal.instance.pause import PAUSE_PATH, pause_rootfs
from tidal.instance.spec import MAIN, InstanceSpec, MemberSpec
from tidal.instance.store import SANDBOX, InstanceRecord, InstanceStore

log = logging.getLogger(__name__)
LABEL_ID = "tidal.instance.id"
LABEL_NAME = "tidal.instance"
LABEL_ROLE = "tidal.instance.role"
POD_WARM_MONITORS = 3
"""Container monitors the engine keeps started ahead: a sandbox and two containers."""


def node_capacity(settings: InstanceSettings) -> Capacity:
    """The node's CPUs and memory, or what ``[instance]`` configures."""
    cpus = settings.capacity_cpus or float(os.cpu_count() or 1)
    mem = settings.capacity_memory_bytes
    if mem is None:
        mem = 0
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    return Capacity(cpus, mem)


def hosts_file(name: str, ip: str | None) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{ip or '127.0.1.1'}\t{name}")
    return "\n".join(lines) + "\n"


class InstanceManager:
    """Instance lifecycle on one :class:`Engine`. Thread-safe."""

    def __init__(self, engine: Engine, settings: InstanceSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or load_instance_settings()
        self.catalog = Catalog(self.settings)
        self.dir = engine.state_dir / "instances"
        self.store = InstanceStore(self.dir / "records")
        self._create_lock = threading.Lock()
        # a pod start takes a monitor per container at once; keep enough started ahead
        engine.monitors.size = max(engine.monitors.size, POD_WARM_MONITORS)
        for _ in range(POD_WARM_MONITORS):
            engine.monitors.replenish()
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def _lock(self, iid: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(iid, threading.RLock())

    def pod_dir(self, rec: InstanceRecord) -> Path:
        return self.dir / "pods" / rec.id

    def cgroup(self, rec: InstanceRecord) -> PodCgroup:
        return PodCgroup(rec.cgroup, self.engine.cgroup_root)

    # --- choosing ------------------------------------------------------------------------------

    def reserved(
        self, records: list[InstanceRecord] | None = None, *, recorded: bool = False
    ) -> Capacity:
        """What live instances hold of the node: those being created and those whose main
        container runs (a stopped or finished instance keeps its record, not its share).
        ``records``: the store's list when the caller has just read it. ``recorded``: take
        main's status as the engine recorded it (one query) instead of refreshing each
        container (a read of its exit file, ~1-2 ms each): it can only count an instance
        that exited unnoticed as running, never the other way round."""
        recs = self.store.list() if records is None else records
        if recorded:
            running = self.engine.store.names_in("running")
            return Capacity.total(
                Capacity.of(r.limits)
                for r in recs
                if r.phase == "creating"
                or (r.phase == "running" and r.container_name(MAIN) in running)
            )
        return Capacity.total(
            Capacity.of(r.limits)
            for r in recs
            if r.phase == "creating" or self.status(r) == "running"
        )

    def capacity(self) -> Capacity:
        return node_capacity(self.settings)

    # --- run -----------------------------------------------------------------------------------

    def run(self, spec: InstanceSpec) -> InstanceRecord:
        """Create and start the instance; on failure nothing of it is left."""
        runtime = spec.runtime or "runc"
        self.engine.runtime(runtime)  # a runtime that is not installed fails before any effect
        candidates = self.catalog.resolve(spec.specs)
        iid = InstanceId(secrets.token_hex(16))
        name = spec.name or f"i-{iid[:8]}"
        with self._create_lock:
            records = self.store.list()  # once: each read parses every record's file
            if any(r.name == name for r in records):
                raise ConfigError(
                    f"an instance named {name!r} already exists; pick another --name or "
                    f"remove it with 'tidal instance rm {name}'"
                )
            taken = self.engine.store.names()
            clash = [f"{name}.{m}" for m in (SANDBOX, MAIN, *(m.name for m in spec.members))]
            clash = [c for c in clash if c in taken]
            if clash:
                raise ConfigError(f"containers named {clash} already exist; pick another --name")
            try:  # the records' word first; refreshed only when that leaves no room
                choice = choose(
                    candidates, spec.limits, self.capacity(), self.reserved(records, recorded=True)
                )
            except NoCapacityError:
                choice = choose(candidates, spec.limits, self.capacity(), self.reserved(records))
            rec = self.store.put(
                InstanceRecord(
                    id=iid,
                    name=name,
                    spec=spec,
                    phase="creating",
                    runtime=runtime,
                    cgroup=f"{self.engine.settings.cgroup_parent}/pod-{iid[:12]}",
                    created_at=time.time(),
                    chosen=choice.type,
                    limits=choice.limits,
                )
            )
        try:
            rec = self._make(rec)
        except BaseException as exc:
            why = str(exc)
            try:
                self._undo(rec)
            except TidalError as undo_exc:
                log.error("rolling back instance %s: %s", name, undo_exc)
                self.store.put(rec.replace(phase="removing", error=f"{why}; {undo_exc}"))
            raise
        log.info("instance %s (%s) running, %s", rec.name, rec.id[:12], rec.ip)
        return rec

    def _labels(self, rec: InstanceRecord, role: str) -> tuple[tuple[str, str], ...]:
        return (
            *rec.spec.labels,
            (LABEL_ID, rec.id),
            (LABEL_NAME, rec.name),
            (LABEL_ROLE, role),
        )

    def _sandbox_spec(self, rec: InstanceRecord) -> ContainerSpec:
        return ContainerSpec(
            image=str(pause_rootfs(self.dir)),
            command=(PAUSE_PATH,),
            name=rec.container_name(SANDBOX),
            hostname=rec.name,
            network="bridge",
            ports=rec.spec.ports,
            runtime=rec.runtime,
            lxcfs=False,
            disk_quotas=(QuotaSpec("/", 0),),
            labels=self._labels(rec, SANDBOX),
            pod_sandbox=True,
            cgroup_parent=rec.cgroup,
            **self._own_limits(rec),
        )

    @staticmethod
    def _own_limits(rec: InstanceRecord) -> dict[str, Any]:
        """Each container also gets the pod's CPU, memory and pids as its own limits: the
        pod's cgroup still caps their sum, and /proc views (lxcfs; gVisor's, where the
        sandbox container's limits hold the whole sandbox) then show the pod's size."""
        return {
            "cpus": rec.limits.cpus,
            "memory_bytes": rec.limits.memory_bytes,
            "pids_limit": rec.limits.pids,
        }

    def _member_spec(self, rec: InstanceRecord, member: MemberSpec, main: bool) -> ContainerSpec:
        pod = self.pod_dir(rec)
        shared = (
            VolumeSpec("/etc/hosts", str(pod / "hosts"), readonly=True),
            VolumeSpec("/etc/hostname", str(pod / "hostname"), readonly=True),
        )
        extra: dict[str, Any] = {}
        if rec.spec.pull is not None:
            if "pull" not in {f.name for f in dataclasses.fields(ContainerSpec)}:
                raise ConfigError(
                    "--pull needs the node's image store (tidal pull), which this build lacks; "
                    "give an image directory without --pull"
                )
            extra["pull"] = rec.spec.pull
        return ContainerSpec(
            image=member.image,
            command=member.command,
            name=rec.container_name(member.name),
            env=(*rec.spec.env, *member.env),
            hostname=rec.name,
            volumes=(*shared, *(rec.spec.volumes if main else ())),
            runtime=rec.runtime,
            rich=member.restart != "no",
            restart=member.restart,
            labels=self._labels(rec, MAIN if main else member.name),
            sandbox=rec.container_name(SANDBOX),  # by name: made alongside, its id comes later
            cgroup_parent=rec.cgroup,
            **self._own_limits(rec),
            **extra,
        )

    def _make(self, rec: InstanceRecord) -> InstanceRecord:
        """Steps 2-6 of the module docstring. Under runc and crun nothing on the critical path
        waits for the sandbox: everything the members join (the netns, the IPC and UTS
        namespace files) is made by its create, which runs alongside the members' creates,
        and the members start with it, so an instance costs about one container create and
        one start. Under runsc the members run inside the sandbox's kernel, which must run
        first. (Each step is mostly waiting on ``ip``, ``mount`` and the runtime.)"""
        cg = self.cgroup(rec)
        cg.create(rec.limits)
        one_kernel = self.engine.runtime(rec.runtime).capabilities.pod_sandbox
        pod = self.pod_dir(rec)
        pod.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pod / "hostname", rec.name + "\n")
        write_text_atomic(pod / "hosts", hosts_file(rec.name, None))  # the address comes below
        main = MemberSpec(MAIN, rec.spec.image, rec.spec.command, restart=rec.spec.restart)
        members = [(main, True), *((m, False) for m in rec.spec.members)]
        with ThreadPoolExecutor(max_workers=2 + len(members)) as pool:
            started: list[Future[ContainerRecord]] = []

            def make_sandbox() -> ContainerRecord:
                sandbox = self.engine.create(self._sandbox_spec(rec))
                started.append(pool.submit(self.engine.start, sandbox.id))
                return sandbox

            sandbox_made = pool.submit(make_sandbox)
            try:
                created = [
                    self.engine.create(self._member_spec(rec, m, is_main)) for m, is_main in members
                ]
            finally:
                sandbox = sandbox_made.result()  # its error, if both failed
            sandbox_started = started[0]
            unenforced: list[str] = []
            if sandbox.ip is not None:
                host_dev, _ = link_names(sandbox.id)
                unenforced = apply_net(rec.limits, host_dev, netns_name(sandbox.id))
            rec = rec.replace(ip=sandbox.ip, unenforced=tuple(unenforced))  # recorded at the end
            write_text_atomic(pod / "hosts", hosts_file(rec.name, sandbox.ip))  # before binds
            lim = rec.limits
            disk = any(
                v is not None
                for v in (
                    lim.disk_read_bps,
                    lim.disk_write_bps,
                    lim.disk_read_iops,
                    lim.disk_write_iops,
                )
            )
            devices = {d for d in (block_device_of(self.engine.state_dir),) if d}
            if disk:
                for crec in created:
                    devices |= self._devices_of(crec)
                cg.limit_devices(lim, devices)
                for crec in created:
                    # made ahead with its limits: the runtime joins it, so the first I/O is held
                    cg.make_child(crec.id)
                    cg.limit_devices(lim, devices, child=crec.id)
            if one_kernel:
                sandbox_started.result()  # runsc: the members run inside the sandbox's kernel
            starts = [pool.submit(self.engine.start, crec.id) for crec in created]
            sandbox_started.result()
            for member_started in starts:
                member_started.result()
        if disk:
            for crec in created:
                cg.adopt_blkio(crec.id)
        return self.store.put(rec.replace(phase="running"))

    @staticmethod
    def _devices_of(crec: ContainerRecord) -> set[tuple[int, int]]:
        """Block devices under a container: its quota volumes and its image's loop device."""
        paths: list[str] = []
        if crec.rootfs.volume is not None:
            paths.append(crec.rootfs.volume.mountpoint)
        if crec.rootfs.layer is not None:
            paths.append(crec.rootfs.layer.lower)
        paths += [v.volume.mountpoint for v in crec.rootfs.volumes if v.volume is not None]
        return {d for d in (block_device_of(Path(p)) for p in paths) if d}

    # --- undo / remove -------------------------------------------------------------------------

    def _containers(self, rec: InstanceRecord) -> list[ContainerRecord]:
        """The pod's containers that exist, in start order (by their derived names)."""
        out = []
        for member in rec.member_names():
            try:
                out.append(self.engine.get(rec.container_name(member)))
            except ContainerNotFoundError:
                continue
        return out

    def _undo(self, rec: InstanceRecord) -> None:
        """Remove members, then the sandbox (its netns and tc go with it), the cgroup, files."""
        errors: list[str] = []
        for crec in reversed(self._containers(rec)):
            try:
                self.engine.remove(crec.id, force=True)
            except TidalError as exc:
                errors.append(f"container {crec.name}: {exc}")
        if not errors:
            try:
                self.cgroup(rec).remove()
            except TidalError as exc:
                errors.append(str(exc))
        if errors:
            raise InstanceError(
                f"removing instance {rec.name} left work undone: {'; '.join(errors)}; "
                "retry 'tidal instance rm'"
            )
        for name in ("hosts", "hostname"):
            (self.pod_dir(rec) / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.pod_dir(rec).rmdir()
        self.store.delete(rec.id)

    def remove(self, ref: str, *, force: bool = False) -> None:
        rec = self.store.get(ref)
        with self._lock(rec.id):
            rec = self.store.get(rec.id)
            if self.status(rec) == "running" and not force:
                raise InstanceStateError(
                    f"instance {rec.name} is running; stop it first or use "
                    "'tidal instance rm --force'"
                )
            rec = self.store.put(rec.replace(phase="removing"))
            self._undo(rec)
        log.info("removed instance %s", rec.name)

    def stop(self, ref: str, timeout_s: float | None = None) -> InstanceRecord:
        """Stop the containers (others first, then main, then the sandbox)."""
        rec = self.store.get(ref)
        with self._lock(rec.id):
            for crec in reversed(self._containers(rec)):
                self.engine.stop(crec.id, timeout_s)
            return self.store.put(self.store.get(rec.id).replace(phase="stopped"))

    # --- observing -----------------------------------------------------------------------------

    def get(self, ref: str) -> InstanceRecord:
        return self.store.get(ref)

    def list_all(self) -> list[InstanceRecord]:
        return self.store.list()

    def status(self, rec: InstanceRecord) -> str:
        if rec.phase != "running":
            return rec.phase
        try:
            main = self.engine.get(rec.container_name(MAIN))
        except ContainerNotFoundError:
            return "broken"
        return "running" if main.status == "running" else "exited"

    def describe(self, rec: InstanceRecord) -> dict[str, Any]:
        """The record as the API shows it: plus status and each container's state."""
        out = rec.to_json()
        out["status"] = self.status(rec)
        out["containers"] = [
            {
                "member": c.name.removeprefix(rec.name + "."),
                "name": c.name,
                "id": c.id,
                "image": c.spec.image,
                "status": c.status,
                "pid": c.pid,
                "exit_code": c.exit_code,
            }
            for c in self._containers(rec)
        ]
        return out

    def _member(self, rec: InstanceRecord, container: str | None) -> str:
        member = container or MAIN
        if member not in rec.member_names():
            raise ConfigError(
                f"instance {rec.name} has no container {member!r}; it has "
                f"{', '.join(rec.member_names()[1:])}"
            )
        return rec.container_name(member)

    def logs(self, ref: str, container: str | None = None, offset: int = 0) -> LogChunk:
        rec = self.store.get(ref)
        return self.engine.logs(self._member(rec, container), offset)

    def exec(
        self,
        ref: str,
        argv: list[str],
        *,
        container: str | None = None,
        env: list[str] | None = None,
        stdin: bytes = b"",
    ) -> ExecResult:
        rec = self.store.get(ref)
        if rec.phase != "running":
            raise InstanceStateError(f"instance {rec.name} is {rec.phase}; exec needs it running")
        return self.engine.exec(self._member(rec, container), argv, env=env, stdin=stdin)

    # --- daemon start, --rm --------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """After a daemon restart: roll back creations and finish removals it interrupted."""
        counts: dict[str, int] = {}
        for rec in self.store.list():
            if rec.phase in ("creating", "removing"):
                log.warning(
                    "instance %s was %s when the daemon stopped; removing it", rec.name, rec.phase
                )
                try:
                    self._undo(rec.replace(phase="removing"))
                except TidalError as exc:
                    log.error("%s", exc)
                    counts["broken"] = counts.get("broken", 0) + 1
                continue
            status = self.status(rec)
            counts[status] = counts.get(status, 0) + 1
        return counts

    def remove_finished(self) -> list[str]:
        """Remove ``--rm`` instances whose main container has exited."""
        removed = []
        for rec in self.store.list():
            if rec.spec.remove_on_exit and rec.phase == "running" and self.status(rec) == "exited":
                try:
                    self.remove(rec.id, force=True)
                except TidalError as exc:
                    log.warning("removing finished instance %s: %s", rec.name, exc)
                    continue
                removed.append(rec.name)
        return removed
