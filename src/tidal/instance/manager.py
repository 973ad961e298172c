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
4. start the sandbox only where it needs a process (:meth:`InstanceManager.sandbox_runs`:
   under runsc it is the pod's gVisor kernel, and published ports are bound by its monitor);
   a runc/crun pod without ports keeps its sandbox *created*: namespaces and an address, no
   process, no runtime call. Shape its veth (tc, both directions), write its address into
   ``/etc/hosts``, limit the containers' block devices;
5. start the containers without waiting for the sandbox (runc/crun: nothing they join needs
   its process), or once it runs (runsc: they run inside its gVisor kernel);
6. record the IP and phase ``running``.

A failure at any step undoes what was made (containers by their names, which takes the
sandbox's netns and namespace files along, the cgroup, the record) and raises one error naming
the cause; a daemon killed meanwhile leaves a ``creating`` record that
:meth:`InstanceManager.reconcile` rolls back the same way.

With warm pools on (``[instance] pool_max`` > 0, :mod:`tidal.instance.pool`), step 1 also
takes a ready pool member of the chosen shape when there is one and writes its id into the
record (``pool_member``, ``sandbox_id``, its cgroup); steps 2 and 4's shaping are then done
already, and step 3 hands the sandbox over (renamed ``<name>.sandbox``, its UTS hostname
set) instead of creating it. ``rm`` puts a runc/crun sandbox back into its pool when the pool
is below its target (:meth:`InstanceManager._return_to_pool`), else tears it down. Each
phase's seconds are recorded (``InstanceRecord.timings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tidal import proc
from tidal.engine.containers import Engine, LogChunk
from tidal.engine.network import host_link
from tidal.engine.runtime import ExecResult, OciCliRuntime
from tidal.engine.spec import ContainerSpec, PortMapping, VolumeSpec
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
from tidal.instance.capacity import Capacity, choose, shortfall
from tidal.instance.catalog import Catalog, InstanceSettings, load_instance_settings
from tidal.instance.identity import cri_log_spec
from tidal.instance.limits import PodCgroup, apply_net, block_device_of
from tidal.instance.pause import PAUSE_PATH, pause_rootfs
from tidal.instance.pool import PoolKey, PoolMember, Pools, PoolStore
from tidal.instance.spec import MAIN, InstanceSpec, MemberSpec
from tidal.instance.store import SANDBOX, InstanceRecord, InstanceStore

log = logging.getLogger(__name__)
LABEL_ID = "tidal.instance.id"
LABEL_NAME = "tidal.instance"
LABEL_ROLE = "tidal.instance.role"
LABEL_POOL = "tidal.pool"
"""On a warm sandbox: its pool's shape id."""
LABEL_POOL_MEMBER = "tidal.pool.member"
"""On a warm sandbox: its pool member record's id."""
POD_WARM_MONITORS = 3
"""Container monitors the engine keeps started ahead: a sandbox and two containers."""


def node_capacity(settings: InstanceSettings) -> Capacity:
    """The node's CPUs and memory, or what ``[instance]`` configures."""
    cpus = settings.capacity_cpus or float(os.cpu_count() or 1)
    mem = settings.capacity_memory_bytes
    return Capacity(cpus, _mem_total_bytes() if mem is None else mem)


@functools.cache
def _mem_total_bytes() -> int:
    """``MemTotal`` of ``/proc/meminfo``, read once: it is fixed while the host runs, and
    capacity is asked several times per create."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class PhaseClock:
    """Wall-clock seconds of each phase of ``run``, for ``InstanceRecord.timings``."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append((phase, now - self.last))
        self.last = now

    def timings(self) -> tuple[tuple[str, float], ...]:
        return (*self.phases, ("total", time.monotonic() - self.t0))


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
        self.pool_store = PoolStore(self.dir / "pool")
        self.pools = Pools(
            self.pool_store,
            self,
            pool_min=self.settings.pool_min,
            pool_max=self.settings.pool_max,
        )
        self.pools.cgroup_parent = engine.settings.cgroup_parent

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
        """Create and start the instance; on failure nothing of it is left.

        With pools on (``[instance] pool_max`` > 0), an instance without published ports
        whose shape has a ready warm sandbox takes it (:mod:`tidal.instance.pool`) and makes
        only its members; a miss makes room by evicting idle members if the node would
        otherwise be overbooked, then takes today's path. While it runs, the pools' refill
        waits (:meth:`Pools.creating`)."""
        with self.pools.creating():
            return self._run(spec)

    def _run(self, spec: InstanceSpec) -> InstanceRecord:
        clock = PhaseClock()
        runtime = spec.runtime or "runc"
        self.engine.runtime(runtime)  # a runtime that is not installed fails before any effect
        candidates = self.catalog.resolve(spec.specs)
        iid = InstanceId(secrets.token_hex(16))
        name = spec.name or f"i-{iid[:8]}"
        member: PoolMember | None = None
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
            held, fresh = self.reserved(records, recorded=True), False
            try:  # the records' word first; refreshed only when that leaves no room
                choice = choose(candidates, spec.limits, self.capacity(), held)
            except NoCapacityError:
                held, fresh = self.reserved(records), True
                choice = choose(candidates, spec.limits, self.capacity(), held)
            key = PoolKey(runtime, choice.limits)
            if self._poolable(spec):
                member = self.pools.take(key)
                if member is None:
                    self._make_room(choice.limits, records, held, fresh=fresh)
            rec = self.store.put(
                InstanceRecord(
                    id=iid,
                    name=name,
                    spec=spec,
                    phase="creating",
                    runtime=runtime,
                    cgroup=member.cgroup
                    if member
                    else f"{self.engine.settings.cgroup_parent}/pod-{iid[:12]}",
                    created_at=time.time(),
                    chosen=choice.type,
                    limits=choice.limits,
                    sandbox_id=member.sandbox_id if member else None,
                    pool_member=member.id if member else None,
                )
            )
        if member is not None:
            self.pool_store.delete(member.id)  # the instance's record owns the sandbox now
        clock.mark("record")
        try:
            rec = self._make(rec, member, clock)
        except BaseException as exc:
            why = str(exc)
            try:
                self._undo(rec)
            except TidalError as undo_exc:
                log.error("rolling back instance %s: %s", name, undo_exc)
                self.store.put(rec.replace(phase="removing", error=f"{why}; {undo_exc}"))
            if member is not None:
                self.pools.released(key, from_pool=True)
            raise
        log.info(
            "instance %s (%s) running, %s%s",
            rec.name,
            rec.id[:12],
            rec.ip,
            " (warm sandbox)" if member else "",
        )
        return rec

    def sandbox_runs(self, runtime: str, ports: tuple[PortMapping, ...] = ()) -> bool:
        """Whether a pod's sandbox is started (a process) or only created (namespaces).

        Under runsc the sandbox is the pod's gVisor kernel, and a published port is bound by
        the sandbox's monitor when it starts (:mod:`tidal.engine.monitor`), so those run a
        pause process. Otherwise (runc, crun, no ports) everything the members share is made
        by the sandbox's create: the netns with its veth and address, the IPC and UTS
        namespace files, which the members join by path, and no PID namespace is shared, so
        there is nothing for a process to hold or reap. Not starting it saves a runtime
        create and start, a monitor and ~1 MiB per pod: at a burst's rate the node's CPU
        went half to ``runc`` (measured: bench_instance_rate, README)."""
        if self.engine.runtime(runtime).capabilities.pod_sandbox:
            return True
        return bool(ports)

    def _poolable(self, spec: InstanceSpec) -> bool:
        """Published ports are bound by the sandbox's monitor when it starts, so such
        instances make their own sandbox (see :mod:`tidal.instance.pool`)."""
        return self.pools.enabled and not spec.ports

    def _make_room(
        self, limits: Any, records: list[InstanceRecord], held: Capacity, *, fresh: bool
    ) -> None:
        """Evict idle warm sandboxes until live instances, this one and the pools fit the
        node (the pools never overbook it; a create comes before a warm sandbox). ``held``:
        what the caller found the instances (``records``) hold, ``fresh`` if refreshed."""
        need = Capacity.of(limits)
        if not fresh and shortfall(need, self.capacity().minus(held).minus(self.pools.pooled())):
            held = self.reserved(records)
        while True:
            free = self.capacity().minus(held).minus(self.pools.pooled())
            if not shortfall(need, free):
                return
            victim = self.pools.evict_one()
            if victim is None:
                return  # choose() already checked the instances alone; nothing more to give
            self.pools.destroy(victim)

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
            read_only_rootfs=True,  # no overlay, no quota volume: pause writes nothing
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

    def _member_spec(
        self, rec: InstanceRecord, member: MemberSpec, main: bool, sandbox_ref: str | None = None
    ) -> ContainerSpec:
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
            # by name: made alongside, its id comes later (a warm one's by id: renamed meanwhile)
            sandbox=sandbox_ref or rec.container_name(SANDBOX),
            cgroup_parent=rec.cgroup,
            cri_log=cri_log_spec(rec, member.name, self.settings),
            **self._own_limits(rec),
            **extra,
        )

    def _make(
        self, rec: InstanceRecord, member: PoolMember | None, clock: PhaseClock
    ) -> InstanceRecord:
        """Steps 2-6 of the module docstring. Under runc and crun nothing on the critical path
        waits for the sandbox: everything the members join (the netns, the IPC and UTS
        namespace files) is made by its create, which runs alongside the members' creates,
        and the members start with it, so an instance costs about one container create and
        one start. Under runsc the members run inside the sandbox's kernel, which must run
        first. (Each step is mostly waiting on ``ip``, ``mount`` and the runtime.)

        With a warm ``member`` the cgroup, sandbox, netns and shaping exist already: the
        sandbox is handed over (renamed, hostname set) alongside the members' creates."""
        cg = self.cgroup(rec)
        if member is None:
            cg.create(rec.limits)
            clock.mark("cgroup")
        one_kernel = self.engine.runtime(rec.runtime).capabilities.pod_sandbox
        pod = self.pod_dir(rec)
        pod.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pod / "hostname", rec.name + "\n")
        write_text_atomic(pod / "hosts", hosts_file(rec.name, None))  # the address comes below
        main = MemberSpec(MAIN, rec.spec.image, rec.spec.command, restart=rec.spec.restart)
        members = [(main, True), *((m, False) for m in rec.spec.members)]
        sandbox_ref = member.sandbox_id if member else None
        with ThreadPoolExecutor(max_workers=2 + len(members)) as pool:
            started: list[Future[ContainerRecord]] = []

            def make_sandbox() -> ContainerRecord:
                sandbox = self.engine.create(self._sandbox_spec(rec))
                if self.sandbox_runs(rec.runtime, rec.spec.ports):
                    started.append(pool.submit(self.engine.start, sandbox.id))
                else:  # its cgroup all the same: the POD series read it (tidal.instance.metrics)
                    cg.make_empty_child(sandbox.id)
                return sandbox

            if member is None:
                sandbox_made = pool.submit(make_sandbox)
            else:
                sandbox_made = pool.submit(self._hand_over, rec, member, one_kernel)
            try:
                created = [
                    self.engine.create(self._member_spec(rec, m, is_main, sandbox_ref))
                    for m, is_main in members
                ]
            finally:
                sandbox = sandbox_made.result()  # its error, if both failed
            clock.mark("create")
            sandbox_started = started[0] if started else None
            unenforced: list[str] = list(member.unenforced) if member else []
            if sandbox.ip is not None and member is None:
                host_dev = host_link(sandbox.id)
                unenforced = apply_net(
                    rec.limits, host_dev, self.engine.network.netns_path(sandbox.id)
                )
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
            clock.mark("limits")
            if one_kernel and sandbox_started is not None:
                sandbox_started.result()  # runsc: the members run inside the sandbox's kernel
            starts = [pool.submit(self.engine.start, crec.id) for crec in created]
            if sandbox_started is not None:
                sandbox_started.result()
            for member_started in starts:
                member_started.result()
            clock.mark("start")
        if disk:
            for crec in created:
                cg.adopt_blkio(crec.id)
        return self.store.put(rec.replace(phase="running", timings=clock.timings()))

    def _hand_over(
        self, rec: InstanceRecord, member: PoolMember, one_kernel: bool
    ) -> ContainerRecord:
        """A warm sandbox becomes the instance's: its name, labels and hostname. The engine
        has no rename verb; the record's name and spec are the engine store's columns, and
        nothing else keys on the name (directories, netns and cgroups go by id)."""
        assert member.sandbox_id is not None
        sandbox = self.engine.store.get(member.sandbox_id)
        spec = sandbox.spec.replace(
            name=rec.container_name(SANDBOX),
            hostname=rec.name,
            labels=self._labels(rec, SANDBOX),
        )
        self.engine.store.update(sandbox.id, name=spec.name, spec=spec)
        if one_kernel:
            self._set_sandbox_kernel_hostname(sandbox, rec.name)
        else:
            self.engine.pod_namespaces.set_hostname(self.engine.pod_ns_dir(sandbox.id), rec.name)
        return self.engine.get(sandbox.id)

    def _set_sandbox_kernel_hostname(self, sandbox: ContainerRecord, hostname: str) -> None:
        """Under runsc the members share the gVisor kernel's UTS namespace, which the host
        cannot enter: the pause binary sets it from inside (``pause -n NAME``), run by the
        runtime's ``exec`` with ``CAP_SYS_ADMIN`` (the sandbox itself keeps the default
        capabilities). The engine's ``exec`` takes no capabilities, hence the runtime's CLI."""
        rt = self.engine.runtime(sandbox.runtime)
        if not isinstance(rt, OciCliRuntime):
            raise InstanceError(
                f"runtime {sandbox.runtime} has no CLI to rename a warm sandbox with; "
                "turn pools off ([instance] pool_max = 0) for it"
            )
        proc.run(
            [
                *rt.global_args(),
                *rt.container_args(sandbox.id),
                "exec",
                "--cap",
                "CAP_SYS_ADMIN",
                sandbox.id,
                PAUSE_PATH,
                "-n",
                hostname,
            ],
            what=f"setting hostname {hostname!r} in warm sandbox {sandbox.name}",
            error=InstanceError,
            timeout_s=30,
        )

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
            refs = [rec.container_name(member)]
            if member == SANDBOX and rec.sandbox_id:
                refs.append(rec.sandbox_id)  # a warm one: renamed at hand-out and back
            for ref in refs:
                try:
                    out.append(self.engine.get(ref))
                except ContainerNotFoundError:
                    continue
                break
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
        """Remove the instance; its sandbox goes back to its pool when the pool is below its
        target (and the sandbox can be cleaned: see :meth:`_return_to_pool`), else it is
        torn down with the rest."""
        rec = self.store.get(ref)
        with self._lock(rec.id):
            rec = self.store.get(rec.id)
            if self.status(rec) == "running" and not force:
                raise InstanceStateError(
                    f"instance {rec.name} is running; stop it first or use "
                    "'tidal instance rm --force'"
                )
            rec = self.store.put(rec.replace(phase="removing"))
            key = PoolKey(rec.runtime, rec.limits)
            reused = False
            if self._may_reuse(rec):
                try:
                    reused = self._return_to_pool(rec)
                except TidalError as exc:
                    log.warning(
                        "the sandbox of instance %s could not be reused (%s); tearing it down",
                        rec.name,
                        exc,
                    )
                    rec = self.store.get(rec.id)
            if not reused:
                self._undo(rec)
            if self.pools.enabled:
                self.pools.released(key, from_pool=rec.pool_member is not None)
        log.info("removed instance %s%s", rec.name, " (sandbox back in its pool)" if reused else "")

    def _may_reuse(self, rec: InstanceRecord) -> bool:
        """runc/crun pods only: under runsc the sandbox's gVisor kernel keeps the last pod's
        state (its tmpfs, IPC, sockets' history), which no host-side step can clean."""
        if not self._poolable(rec.spec):
            return False
        if self.engine.runtime(rec.runtime).capabilities.pod_sandbox:
            return False
        return self.pools.wants(PoolKey(rec.runtime, rec.limits))

    def _return_to_pool(self, rec: InstanceRecord) -> bool:
        """Clean a released instance's pod and put its sandbox back in its pool: members
        gone, pod cgroup holding nothing but the sandbox, hostname and IPC namespace reset,
        neighbours flushed, ``tc`` re-applied as the shape's. The instance record names the
        new member before the member's record exists, so a crash anywhere here leaves the
        instance owning (and its reconcile removing) the sandbox. False: nothing to reuse."""
        found = self._containers(rec)
        sandbox = next((c for c in found if c.spec.pod_sandbox), None)
        if sandbox is None or not self._sandbox_up(sandbox) or sandbox.ip is None:
            return False
        mid = secrets.token_hex(16)
        rec = self.store.put(rec.replace(pool_member=mid, sandbox_id=sandbox.id))
        for crec in reversed([c for c in found if c.id != sandbox.id]):
            self.engine.remove(crec.id, force=True)
        member = self.pool_store.put(
            PoolMember(
                id=mid,
                key=PoolKey(rec.runtime, rec.limits),
                phase="cleaning",
                cgroup=rec.cgroup,
                created_at=time.time(),
                sandbox_id=sandbox.id,
                ip=sandbox.ip,
                unenforced=rec.unenforced,
            )
        )
        self._clean(member)
        ready = self.pool_store.put(member.replace(phase="ready"))
        self.store.delete(rec.id)  # from here on the member is the pool's
        for name in ("hosts", "hostname"):
            (self.pod_dir(rec) / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.pod_dir(rec).rmdir()
        self.pools.add_ready(ready)
        return True

    def _pool_hostname(self, member: PoolMember) -> str:
        return f"pool-{member.id[:12]}"

    def _pool_labels(self, member: PoolMember) -> tuple[tuple[str, str], ...]:
        return (
            (LABEL_POOL, member.key.id),
            (LABEL_POOL_MEMBER, member.id),
            (LABEL_ROLE, SANDBOX),
        )

    def _clean(self, member: PoolMember) -> None:
        """What :meth:`_return_to_pool` resets (see there); raises if the pod is not empty."""
        assert member.sandbox_id is not None
        sandbox = self.engine.store.get(member.sandbox_id)
        spec = sandbox.spec.replace(
            name=member.sandbox_name,
            hostname=self._pool_hostname(member),
            labels=self._pool_labels(member),
        )
        self.engine.store.update(sandbox.id, name=spec.name, spec=spec)
        nsdir = self.engine.pod_ns_dir(sandbox.id)
        self.engine.pod_namespaces.set_hostname(nsdir, self._pool_hostname(member))
        self.engine.pod_namespaces.renew_ipc(nsdir)
        cg = PodCgroup(member.cgroup, self.engine.cgroup_root)
        cg.remove_children(keep=sandbox.id)
        left = cg.processes(exclude_child=sandbox.id)
        if left:
            raise InstanceError(
                f"pod cgroup {member.cgroup} still holds processes {left[:10]} after its "
                "members were removed"
            )
        self.engine.network.flush_neighbours(sandbox.id)
        apply_net(
            member.key.limits, host_link(sandbox.id), self.engine.network.netns_path(sandbox.id)
        )

    # --- the pools' side (tidal.instance.pool.SandboxFactory) --------------------------------

    def _member_sandbox_spec(self, member: PoolMember) -> ContainerSpec:
        lim = member.key.limits
        return ContainerSpec(
            image=str(pause_rootfs(self.dir)),
            command=(PAUSE_PATH,),
            name=member.sandbox_name,
            hostname=self._pool_hostname(member),
            network="bridge",
            runtime=member.key.runtime,
            lxcfs=False,
            read_only_rootfs=True,  # no overlay, no quota volume: pause writes nothing
            labels=self._pool_labels(member),
            pod_sandbox=True,
            cgroup_parent=member.cgroup,
            cpus=lim.cpus,
            memory_bytes=lim.memory_bytes,
            pids_limit=lim.pids,
        )

    def _sandbox_up(self, sandbox: ContainerRecord) -> bool:
        """A pod's sandbox is as it should be: running, or, where it needs no process
        (:meth:`sandbox_runs`), created and never started."""
        if sandbox.status == "running":
            return True
        runs = self.sandbox_runs(sandbox.runtime, sandbox.spec.ports)
        return not runs and sandbox.status == "created" and sandbox.starts == 0

    def make_member(self, member: PoolMember) -> PoolMember:
        """A warm pod: cgroup with the shape's limits, sandbox created (and started where it
        needs a process: :meth:`sandbox_runs`), tc on."""
        cg = PodCgroup(member.cgroup, self.engine.cgroup_root)
        cg.create(member.key.limits)
        sandbox = self.engine.create(self._member_sandbox_spec(member))
        member = self.pool_store.put(member.replace(sandbox_id=sandbox.id))
        if self.sandbox_runs(member.key.runtime):
            self.engine.start(sandbox.id)
        else:
            cg.make_empty_child(sandbox.id)
        unenforced: list[str] = []
        if sandbox.ip is not None:
            host_dev = host_link(sandbox.id)
            unenforced = apply_net(
                member.key.limits, host_dev, self.engine.network.netns_path(sandbox.id)
            )
        return member.replace(phase="ready", ip=sandbox.ip, unenforced=tuple(unenforced))

    def destroy_member(self, member: PoolMember) -> None:
        """The member's sandbox (by id, else by its pool name) and its cgroup."""
        for ref in (member.sandbox_id, member.sandbox_name):
            if not ref:
                continue
            try:
                crec = self.engine.get(ref)
            except ContainerNotFoundError:
                continue
            self.engine.remove(crec.id, force=True)
            break
        PodCgroup(member.cgroup, self.engine.cgroup_root).remove()

    def room_for(self, key: PoolKey, pooled: Capacity) -> bool:
        """Whether a member of ``key`` fits beside the live instances and ``pooled``. The
        engine's recorded statuses (one query per refill step, not one read per instance):
        an exit nobody looked at yet only makes the pool wait, never overbook."""
        free = self.capacity().minus(self.reserved(recorded=True)).minus(pooled)
        return not shortfall(Capacity.of(key.limits), free)

    def key_of(self, spec: InstanceSpec) -> PoolKey:
        """The pool shape of ``spec``: its runtime and the type its fallback chooses now."""
        if spec.ports:
            raise ConfigError(
                "instances that publish ports make their own sandbox (pools skip them); "
                "prewarm a spec without --publish"
            )
        runtime = spec.runtime or "runc"
        self.engine.runtime(runtime)
        candidates = self.catalog.resolve(spec.specs)
        choice = choose(candidates, spec.limits, self.capacity(), self.reserved())
        return PoolKey(runtime, choice.limits)

    def prewarm(self, spec: InstanceSpec, count: int) -> dict[str, Any]:
        """Fill the pool of the spec's shape (the type its fallback would choose now) to at
        least ``count`` ready sandboxes; returns that pool's status."""
        key = self.key_of(spec)
        self.pools.prewarm(key, count)
        return next(p for p in self.pools.status() if p["id"] == key.id)

    def _member_whole(self, member: PoolMember) -> bool:
        """A ready member survives a daemon restart if its sandbox runs with everything."""
        if member.phase != "ready" or not member.sandbox_id:
            return False
        try:
            sandbox = self.engine.get(member.sandbox_id)
        except ContainerNotFoundError:
            return False
        if not self._sandbox_up(sandbox) or sandbox.name != member.sandbox_name:
            return False
        if sandbox.ip is None or not self.engine.network.netns_exists(sandbox.id):
            return False
        one_kernel = self.engine.runtime(member.key.runtime).capabilities.pod_sandbox
        if not one_kernel and not self.engine.pod_namespaces.exists(
            self.engine.pod_ns_dir(sandbox.id)
        ):
            return False
        return bool(PodCgroup(member.cgroup, self.engine.cgroup_root).dirs())

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
        """After a daemon restart: roll back creations and finish removals it interrupted;
        keep whole warm sandboxes, tear down half-made ones (the refill rebuilds the pools).

        A pool member named by an instance record belongs to that instance (it was being
        handed out or returned): its member record is dropped first and the instance's own
        reconcile decides. Then every other member is kept if ready and whole, else torn
        down; last, a warm sandbox no record names at all (none should exist) is removed."""
        counts: dict[str, int] = {}

        def count(what: str) -> None:
            counts[what] = counts.get(what, 0) + 1

        if self.pools.enabled:
            self.pools.load_state()

        recs = self.store.list()
        owned = {r.pool_member for r in recs if r.pool_member}
        members = self.pool_store.list()
        for m in members:
            if m.id in owned:
                self.pool_store.delete(m.id)
        for rec in recs:
            if rec.phase in ("creating", "removing"):
                log.warning(
                    "instance %s was %s when the daemon stopped; removing it", rec.name, rec.phase
                )
                try:
                    self._undo(rec.replace(phase="removing"))
                except TidalError as exc:
                    log.error("%s", exc)
                    count("broken")
                continue
            status = self.status(rec)
            count(status)
            if rec.pool_member and status == "running":
                self.pools.adopt_in_use(PoolKey(rec.runtime, rec.limits))
        kept: set[str] = set()
        for m in members:
            if m.id in owned:
                continue
            if self.pools.enabled and self._member_whole(m):  # pools since turned off: none kept
                self.pools.add_ready(m)
                kept.add(m.id)
                count("pool_ready")
                continue
            log.warning("warm sandbox %s was %s; tearing it down", m.sandbox_name, m.phase)
            try:
                self.destroy_member(m)
            except TidalError as exc:
                log.error("tearing down warm sandbox %s: %s", m.sandbox_name, exc)
                count("pool_broken")
                continue
            self.pool_store.delete(m.id)
            count("pool_torn_down")
        claimed = {r.sandbox_id for r in self.store.list() if r.sandbox_id}
        for crec in self.engine.store.list():
            mid = dict(crec.spec.labels).get(LABEL_POOL_MEMBER)
            if mid is None or mid in kept or crec.id in claimed:
                continue
            if not crec.name.startswith("pool."):
                continue  # handed out: the instance's labels replaced these
            log.warning("warm sandbox %s has no record; removing it", crec.name)
            try:
                self.engine.remove(crec.id, force=True)
                if crec.spec.cgroup_parent:
                    PodCgroup(crec.spec.cgroup_parent, self.engine.cgroup_root).remove()
            except TidalError as exc:
                log.error("removing stray warm sandbox %s: %s", crec.name, exc)
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
