"""The engine: container lifecycle on top of a runtime, storage, network and the store.

:class:`Engine` is what the daemon serves. Each container has a directory
``<state>/containers/<id>/`` (bundle, rootfs mount points, quota volume, log, the monitor's
``start.json``/``exit.json``) and a row in the state database. The engine never waits on a
container itself: its monitor does (see :mod:`tidal.engine.monitor`), and every read of a
record first folds in what the monitor wrote (:meth:`Engine.refresh`), which is also how a
restarted daemon finds its containers again (:meth:`Engine.reconcile`).

The engine reaches the host only through its adapters, each replaceable by a fake from
:mod:`tidal.testing.engine`: a runtime factory (runc, crun), a :class:`Mounter` that executes
the storage plans (:mod:`tidal.engine.storage`), a :class:`Network` and the
:class:`~tidal.engine.podns.PodNamespaces` a pod's sandbox holds its IPC and UTS in. Concerns live apart:
bundles in :mod:`tidal.engine.assemble`, monitor hand-over in :mod:`tidal.engine.launcher`,
published ports in :mod:`tidal.engine.ports`, upgrade and rollback in
:mod:`tidal.engine.upgrade`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tidal.cgroups import CGROUP_ROOT
from tidal.engine import upgrade as upgrade_mod
from tidal.engine.assemble import HostView, host_cpus, write_container_bundle
from tidal.engine.attach import ATTACH_SOCKET
from tidal.engine.bundle import cpuset_for, hostname, resources_from
from tidal.engine.crilog import remove_logs as remove_cri_logs
from tidal.engine.hostprep import prepare_hybrid_cgroups
from tidal.engine.launcher import MonitorLaunch, MonitorPool, ZygoteLaunch, hand_over
from tidal.engine.lxcfs import LxcfsSupervisor
from tidal.engine.lxcfs import available as lxcfs_available
from tidal.engine.monitor import (
    CONTAINERS_DIR,
    START_FILE,
    MonitorConfig,
    PortForward,
    StartReport,
    read_exit_record,
    read_start_report,
)
from tidal.engine.mounter import HostMounter, Mounter
from tidal.engine.network import BridgeNetwork, Network
from tidal.engine.podns import POD_NS_DIR, HostPodNamespaces, PodNamespaces
from tidal.engine.ports import check_ports
from tidal.engine.richinit import read_service_states
from tidal.engine.rootfs import provider_for
from tidal.engine.runtime import ExecResult, Runtime, get_runtime, pid_alive
from tidal.engine.settings import EngineSettings, load_settings
from tidal.engine.spec import ContainerSpec, QuotaSpec
from tidal.engine.state import RootfsState
from tidal.engine.storage import Storage
from tidal.engine.store import ContainerRecord, Store
from tidal.engine.volume import VolumePool, volume_usage
from tidal.errors import (
    ConfigError,
    ContainerStateError,
    EngineError,
    OciRuntimeError,
    TidalError,
)
from tidal.ids import ContainerId

log = logging.getLogger(__name__)
MONITOR_EXIT_WAIT_S = 10.0
"""How long ``rm`` waits for an exited container's monitor to finish its cleanup."""
RECONCILE_WAIT_S = 60.0
"""How long a restarted daemon waits for starts still in flight to report."""
RuntimeFactory = Callable[[str, Path], Runtime]


def tail_offset(fh: BinaryIO, lines: int, block: int = 64 * 1024) -> int:
    """Offset in ``fh`` where its last ``lines`` lines start (a last line without its
    newline counts as a line, as ``tail -n`` counts it). Reads backwards block by block,
    so a long log is not read whole."""
    end = fh.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos, want = end, lines
    first = True
    while pos > 0:
        start = max(0, pos - block)
        fh.seek(start)
        data = fh.read(pos - start)
        if first and data.endswith(b"\n"):
            data = data[:-1]  # the final newline ends the last line; it does not start one
        first = False
        i = len(data)
        while True:
            i = data.rfind(b"\n", 0, i)
            if i < 0:
                break
            want -= 1
            if want == 0:
                return start + i + 1
        pos = start
    return 0


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    running: bool


IMAGE_REFERENCE_LABEL = "tidal.image.reference"
"""Set on a container run from a registry reference: the reference, as the user gave it."""


def resolve_image(spec: ContainerSpec) -> ContainerSpec:
    """A spec whose image is a registry reference, turned into the node's pulled copy of it
    (pulled now if ``spec.pull`` says so); directories are returned as they are."""
    from tidal.node.references import looks_like_path

    if looks_like_path(spec.image):
        return spec
    from tidal.node.images import ImageStore  # the registry client loads only for references

    stored = ImageStore().resolve(spec.image, spec.pull)
    labels = tuple(kv for kv in spec.labels if kv[0] != IMAGE_REFERENCE_LABEL)
    return spec.replace(
        image=str(stored.path), labels=(*labels, (IMAGE_REFERENCE_LABEL, stored.reference))
    )


class Engine:
    """Container lifecycle. Thread-safe: one lock per container, one for creation."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        *,
        runtime_factory: RuntimeFactory | None = None,
        mounter: Mounter | None = None,
        network: Network | None = None,
        pod_namespaces: PodNamespaces | None = None,
        cgroup_root: Path = CGROUP_ROOT,
    ) -> None:
        self.settings = settings or load_settings()
        self.state_dir = self.settings.resolved_state_dir()
        self.containers_dir = self.state_dir / CONTAINERS_DIR
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "state.db")
        self.lxcfs = LxcfsSupervisor(self.state_dir / "lxcfs" / "mnt")
        self.cgroup_root = cgroup_root
        self.network = network or BridgeNetwork(self.settings.bridge, self.settings.subnet)
        self.pod_namespaces = pod_namespaces or HostPodNamespaces()
        self._runtime_factory = runtime_factory or self._configured_runtime
        self._create_lock = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._runtimes: dict[str, Runtime] = {}
        self.images_dir = self.state_dir / "images"
        self.mounter = mounter or HostMounter()
        self.anchored = self.mounter.anchor(self.state_dir)
        """The state directory is a mount of its own, so runc and crun create in a view
        without the other containers' mounts (:mod:`tidal.engine.mountview`)."""
        default = self._root_quota_default()
        self.volume_pool = VolumePool(
            self.state_dir / "pool",
            default.size_bytes if default else 0,
            (default.inodes or 0) if default else 0,
            self.settings.volume_pool_size if default else 0,
            self.mounter,
        )
        self.storage = Storage(
            self.store,
            self.mounter,
            self.images_dir,
            self.volume_pool,
            self.settings.bytes_per_inode,
            hot_images=self.settings.hot_images,
            hot_image_idle_s=self.settings.hot_image_idle_s,
        )
        self._refill_wanted = threading.Event()
        self._closing = threading.Event()
        self._refiller: threading.Thread | None = None
        self._hostprep_done = False
        self.monitors = MonitorPool()
        self._bridge_lock = threading.Lock()
        self._bridge_ready = False
        self._fresh: set[str] = set()
        """Containers this engine created and has not started yet: their mounts, netns and
        namespace files were made moments ago, so their first start skips the re-check."""
        self._starting: set[str] = set()
        """Containers whose start this engine has handed to a monitor and not yet recorded:
        their ``start.json`` is ahead of the store by design, not because a daemon died."""

    def close(self) -> None:
        """Stop the pools, release the hot image mounts no container uses, close the database
        (containers keep running, and so do the image mounts they use)."""
        self.storage.trim_hot_images(keep=0)
        self.monitors.close()
        self._closing.set()
        self._refill_wanted.set()
        if self._refiller is not None:
            self._refiller.join()
            self._refiller = None
        self.store.close()
        if self.anchored:
            self.mounter.release_anchor(self.state_dir)

    def _want_refill(self) -> None:
        if self.volume_pool.target <= 0 or self._closing.is_set():
            return
        if self._refiller is None:
            self._refiller = threading.Thread(
                target=self._refill_loop, name="tidal-volume-pool", daemon=True
            )
            self._refiller.start()
        self._refill_wanted.set()

    def _refill_loop(self) -> None:
        while True:
            self._refill_wanted.wait()
            self._refill_wanted.clear()
            if self._closing.is_set():
                return
            try:
                self.volume_pool.refill()
            except TidalError as exc:
                log.warning("volume pool refill failed: %s", exc)

    # --- helpers -----------------------------------------------------------------------------

    def _lock(self, cid: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(cid, threading.RLock())

    def _configured_runtime(self, name: str, state_dir: Path) -> Runtime:
        """The driver with the binary and flags of ``[engine]`` (``runsc_binary``, ...)."""
        return get_runtime(
            name,
            state_dir,
            binary=self.settings.runtime_binary(name),
            options=self.settings.runtime_options(name),
        )

    def runtime(self, name: str) -> Runtime:
        if name not in self._runtimes:
            rt = self._runtime_factory(name, self.state_dir)
            if rt.capabilities.hybrid_cgroups_need_empty_v2 and not self._hostprep_done:
                prepare_hybrid_cgroups(self.cgroup_root)
                self._hostprep_done = True
            self._runtimes[name] = rt
        return self._runtimes[name]

    def cdir(self, cid: str) -> Path:
        return self.containers_dir / cid

    def pod_ns_dir(self, cid: str) -> Path:
        """Where pod sandbox ``cid`` keeps its pod's IPC and UTS namespace files."""
        return self.cdir(cid) / POD_NS_DIR

    def _holds_pod_namespaces(self, spec: ContainerSpec, runtime: str) -> bool:
        """A pod's sandbox under a runtime without one sandbox kernel per pod (runc, crun)
        holds the pod's IPC and UTS namespaces as files (see :mod:`tidal.engine.podns`)."""
        return spec.pod_sandbox and not self.runtime(runtime).capabilities.pod_sandbox

    def cgroups_path(self, cid: str, parent: str | None = None) -> str:
        """``/<parent>/<id>``: ``parent`` is a pod's cgroup (the spec's ``cgroup_parent``) or
        ``[engine] cgroup_parent``."""
        return f"/{parent or self.settings.cgroup_parent}/{cid}"

    def cgroups_path_of(self, rec: ContainerRecord) -> str:
        return self.cgroups_path(rec.id, rec.spec.cgroup_parent)

    def _pinnable_cpus(self, runtime: str | None = None) -> tuple[int, ...]:
        """CPUs a ``--cpus`` container may be pinned to; none where the runtime's own /proc
        already follows the limit (gVisor's ``--cpu-num-from-quota``; runsc also cannot
        write a v1 cpuset below a parent it did not fill)."""
        if runtime is not None and self.runtime(runtime).capabilities.own_proc_view:
            return ()
        return host_cpus(self.cgroup_root) if self.settings.pin_cpus else ()

    def _lxcfs_wanted(self, spec: ContainerSpec, runtime: str | None = None) -> bool:
        if runtime is not None and self.runtime(runtime).capabilities.own_proc_view:
            return False  # its kernel's /proc shows the limits (refused if asked: see _create)
        if spec.lxcfs is not None:
            return spec.lxcfs
        return self.settings.lxcfs != "off" and lxcfs_available()

    def _check_runtime_fits(self, spec: ContainerSpec, rt: Runtime) -> None:
        """Refuse, in one line, what the runtime cannot do (see RuntimeCapabilities)."""
        caps = rt.capabilities
        if spec.lxcfs and caps.own_proc_view:
            raise ConfigError(
                f"--lxcfs does not apply to runtime {rt.name}: its kernel's own /proc already "
                "shows the container's memory and CPU limits; drop --lxcfs"
            )

    def _try(self, what: str, fn: Callable[[], object]) -> bool:
        """Best-effort cleanup step: a failure is logged (never silently dropped)."""
        try:
            fn()
        except TidalError as exc:
            log.warning("%s: %s", what, exc)
            return False
        return True

    # --- create / start ----------------------------------------------------------------------

    def run(self, spec: ContainerSpec) -> ContainerRecord:
        """Create and start; a failed start removes the container again (nothing leaks)."""
        launch = self.monitors.take()
        try:
            rec = self._create(spec)
        except BaseException:
            launch.abort()
            self._background_refills()
            raise
        try:
            return self.start(rec.id, launch=launch)
        except BaseException:
            launch.abort()
            self._try(
                f"removing container {rec.name} after its failed start",
                lambda: self.remove(rec.id, force=True),
            )
            raise
        finally:
            self._background_refills()

    def _background_refills(self) -> None:
        """Spare monitor and quota volumes, made once the start is done: their CPU time
        (an interpreter start, mkfs) would otherwise compete with the start itself."""
        self.monitors.replenish()
        self._want_refill()

    def create(self, spec: ContainerSpec) -> ContainerRecord:
        """Record the container, mount its rootfs and volumes, set up its network."""
        try:
            return self._create(spec)
        finally:
            self._want_refill()

    def _create(self, spec: ContainerSpec) -> ContainerRecord:
        cid = ContainerId(secrets.token_hex(32))
        runtime_name = spec.runtime or self.settings.runtime
        self._check_runtime_fits(spec, self.runtime(runtime_name))  # fail early: no runtime
        spec = resolve_image(spec)
        provider_for(spec.image)  # fail early on a missing image
        if spec.lxcfs and not lxcfs_available():
            raise ConfigError(
                "--lxcfs needs the lxcfs binary and /dev/fuse (apt-get install lxcfs)"
            )
        # every record is read only when there is a port to compare: at 500 live containers
        # the full list cost ~0.5 s of CPU per create, under load
        check_ports(spec, cid, self.store.list() if spec.ports else (), self.network)
        rec = ContainerRecord(
            id=cid,
            name=spec.name or f"tidal-{cid[:8]}",
            spec=spec,
            status="created",
            runtime=runtime_name,
            created_at=time.time(),
        )
        with self._create_lock:
            self.store.insert(rec)
        cdir = self.cdir(cid)
        cdir.mkdir(parents=True)
        try:
            self.storage.prepare(
                cid,
                cdir,
                spec,
                self._root_quota(spec),
                lambda state: self._record_rootfs(cid, state),
            )
            bridged = spec.network == "bridge"
            if self._holds_pod_namespaces(spec, runtime_name):  # the netns too, where it can
                netns = self.network.holder_netns(cid) if bridged else None
                self.pod_namespaces.create(self.pod_ns_dir(cid), hostname(spec, cid), netns=netns)
            if bridged:
                self._ensure_bridge()
                ip = self.store.allocate_ip(cid, self.network.ip_candidates())
                self.network.create_netns(cid, ip)
                self.store.set_fields(cid, ip=ip)
        except BaseException:
            self._try(
                f"undoing the creation of container {rec.name}",
                lambda: self._destroy(self.store.get(cid)),
            )
            raise
        log.info("created container %s (%s) from %s", rec.name, cid[:12], spec.image)
        self._fresh.add(cid)
        return self.store.get(cid)

    def _ensure_bridge(self) -> None:
        """The bridge up and addressed: made once per engine under a lock (concurrent
        creates raced to address it: "Address already assigned"), then only a sysfs look
        per create instead of three ``ip`` processes (made again if it disappeared)."""
        bridge = getattr(self.network, "bridge", None)
        with self._bridge_lock:
            if self._bridge_ready and bridge and Path("/sys/class/net", bridge).exists():
                return
            self.network.ensure_bridge()
            self._bridge_ready = True

    def _record_rootfs(self, cid: str, state: RootfsState) -> None:
        self.store.set_fields(cid, rootfs=state)

    def _root_quota(self, spec: ContainerSpec) -> QuotaSpec | None:
        if spec.read_only_rootfs:
            return None  # nothing is written to the root: no writable layer to bound
        for q in spec.disk_quotas:
            if q.target == "/":
                return q if q.size_bytes > 0 else None  # 0: no quota volume (a pod's sandbox)
        return self._root_quota_default()

    def _root_quota_default(self) -> QuotaSpec | None:
        size = self.settings.default_disk_quota_bytes
        if size <= 0:
            return None
        return QuotaSpec("/", size, max(size // self.settings.bytes_per_inode, 64))

    def _ensure_host(self, rec: ContainerRecord) -> None:
        """Storage and network back in place (after a host reboot or a lost mount)."""
        self.storage.ensure(rec.rootfs)
        if rec.spec.network == "bridge" and rec.ip and not self.network.netns_exists(rec.id):
            # after a host reboot: the same address again, on a recreated bridge
            self._ensure_bridge()
            self.network.create_netns(rec.id, rec.ip)
        if self._holds_pod_namespaces(rec.spec, rec.runtime):
            nsdir = self.pod_ns_dir(rec.id)
            if not self.pod_namespaces.exists(nsdir):  # a host reboot, or made by an older Tidal
                self.pod_namespaces.destroy(nsdir)
                self.pod_namespaces.create(nsdir, hostname(rec.spec, rec.id))

    def _bundle(self, rec: ContainerRecord) -> Path:
        lxcfs_dir: str | None = None
        lxcfs_files: tuple[str, ...] = ()
        if self._lxcfs_wanted(rec.spec, rec.runtime):
            self.lxcfs.ensure()
            lxcfs_dir, lxcfs_files = str(self.lxcfs.proc_dir), self.lxcfs.files()
        host = HostView(
            cgroups_path=self.cgroups_path_of(rec),
            netns_path=self.network.netns_path(rec.id) if rec.spec.network == "bridge" else None,
            lxcfs_proc_dir=lxcfs_dir,
            lxcfs_files=lxcfs_files,
            cpus=self._pinnable_cpus(rec.runtime),
        )
        if rec.spec.sandbox is not None or rec.spec.pod_sandbox:
            host = self._pod_view(rec, host)
        return write_container_bundle(rec, self.cdir(rec.id), self.state_dir / "bin", host)

    def _pod_view(self, rec: ContainerRecord, host: HostView) -> HostView:
        """A pod member joins its sandbox: the runtime's pod annotations, and (where pods do
        not share one sandbox kernel) the pod's net, IPC and UTS namespaces by path.

        Those are the sandbox's named netns and the namespace files it holds from its create
        on (:mod:`tidal.engine.podns`), so neither the sandbox nor the members wait for one
        another. A sandbox without the files (made by an older Tidal) is joined through
        ``/proc/<its pid>/ns``, which needs it running."""
        rt = self.runtime(rec.runtime)
        if rec.spec.pod_sandbox:
            notes = rt.pod_annotations(rec.id, is_sandbox=True)
            host = dataclasses.replace(host, annotations=tuple(notes.items()))
            if self._holds_pod_namespaces(rec.spec, rec.runtime):
                paths = self.pod_namespaces.paths(self.pod_ns_dir(rec.id))
                host = dataclasses.replace(
                    host, ipc_ns_path=str(paths.ipc), uts_ns_path=str(paths.uts)
                )
            return host
        assert rec.spec.sandbox is not None
        # the record alone, not refreshed: the sandbox's own start may be folding it in now
        sandbox = self.store.get(rec.spec.sandbox)
        notes = rt.pod_annotations(sandbox.id, is_sandbox=False)
        if rt.capabilities.pod_sandbox:
            return dataclasses.replace(host, annotations=tuple(notes.items()))
        nsdir = self.pod_ns_dir(sandbox.id)
        held = self.pod_namespaces.exists(nsdir)
        if (
            not held
            and self._holds_pod_namespaces(sandbox.spec, sandbox.runtime)
            and self._never_started(sandbox)
        ):
            # a sandbox that is only its namespaces (a pod without a pause process) after a
            # host reboot: made again, the same address, as its own start would have
            self._ensure_host(sandbox)
            held = self.pod_namespaces.exists(nsdir)
        if sandbox.spec.network == "bridge" and held:
            paths = self.pod_namespaces.paths(nsdir)
            return dataclasses.replace(
                host,
                netns_path=self.network.netns_path(sandbox.id),
                ipc_ns_path=str(paths.ipc),
                uts_ns_path=str(paths.uts),
                annotations=tuple(notes.items()),
            )
        sandbox = self.get(sandbox.id)
        if sandbox.status != "running" or not sandbox.pid:
            raise ContainerStateError(
                f"container {rec.name} joins sandbox {sandbox.name}, which is {sandbox.status}; "
                "start the sandbox first"
            )
        ns = f"/proc/{sandbox.pid}/ns"
        netns = (
            self.network.netns_path(sandbox.id) if sandbox.spec.network == "bridge" else f"{ns}/net"
        )
        return dataclasses.replace(
            host,
            netns_path=netns,
            ipc_ns_path=f"{ns}/ipc",
            uts_ns_path=f"{ns}/uts",
            annotations=tuple(notes.items()),
        )

    def _monitor_conf(self, rec: ContainerRecord, bundle: Path) -> MonitorConfig:
        rt = self.runtime(rec.runtime)
        cdir = self.cdir(rec.id)
        for stale in ("runtime.log", START_FILE):
            with contextlib.suppress(FileNotFoundError):
                (cdir / stale).unlink()
        return MonitorConfig(
            id=rec.id,
            runtime=rt.ref(),
            bundle=str(bundle),
            start_seq=rec.starts + 1,
            cdir=str(cdir),
            cgroup=self.cgroups_path_of(rec),
            cgroup_root=str(self.cgroup_root),
            ports=tuple(
                PortForward(p.host_ip, p.host_port, p.container_port, rec.ip)
                for p in rec.spec.ports
            ),
            interactive=rec.spec.interactive,
            tty=rec.spec.tty,
            cri_log=rec.spec.cri_log,
            mount_view=(
                str(self.state_dir) if self.anchored and rt.capabilities.trimmed_mount_view else ""
            ),
        )

    def start(
        self, ref: str, *, launch: MonitorLaunch | ZygoteLaunch | None = None
    ) -> ContainerRecord:
        """Start a created or exited container through a new monitor."""
        rec = self.get(ref)
        with self._lock(rec.id):
            rec = self.refresh(self.store.get(rec.id))
            if rec.status == "running":
                raise ContainerStateError(f"container {rec.name} is already running")
            self._await_monitor_exit(rec)
            if rec.id in self._fresh and rec.starts == 0:
                self._fresh.discard(rec.id)  # made by this engine just now: all in place
            else:
                # (a reboot or a lost mount since: each check reads the whole mount table)
                self._ensure_host(rec)
            bundle = self._bundle(rec)
            self._starting.add(rec.id)
            try:
                report = hand_over(self._monitor_conf(rec, bundle), launch or self.monitors.take())
                rec = self._fold_start(rec, report)
            finally:
                self._starting.discard(rec.id)
                if launch is None:  # run() replenishes after its own start
                    self.monitors.replenish()
            if rec.status != "running":
                raise OciRuntimeError(f"container {rec.name} did not start: {rec.error}")
            return rec

    def _await_monitor_exit(self, rec: ContainerRecord) -> None:
        """An exited container's monitor may still be running the runtime's delete (and the
        poststop hooks); let it finish rather than race it for the same id, cgroups and
        mounts (runsc's delete waits for the sandbox's gofer: a restart right after an exit
        met "container already exists")."""
        deadline = time.monotonic() + MONITOR_EXIT_WAIT_S
        while rec.monitor_pid and pid_alive(rec.monitor_pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _fold_start(self, rec: ContainerRecord, report: StartReport) -> ContainerRecord:
        """Record what the monitor reported about start number ``report.start_seq``."""
        if report.ok:
            return self.store.update(
                rec.id,
                status="running",
                pid=report.pid,
                monitor_pid=report.monitor_pid,
                started_at=report.started_at,
                finished_at=None,
                exit_code=None,
                signal=None,
                oom_killed=False,
                error=None,
                starts=report.start_seq,
            )
        msg = report.error or "the monitor gave no reason"
        return self.store.update(
            rec.id, status="exited", error=msg, starts=max(rec.starts, report.start_seq)
        )

    # --- observing ---------------------------------------------------------------------------

    def refresh(self, rec: ContainerRecord) -> ContainerRecord:
        """Fold in what the monitor recorded since; decide about lost monitors.

        A start this record has not seen (``start.json`` of a later start number: the daemon
        died while it was in flight) is folded in first, so a running container is never
        left recorded as created with pid 0.
        """
        cdir = self.cdir(rec.id)
        if rec.status != "running":
            if rec.id in self._starting:
                return rec  # this engine records that start itself, in a moment
            report = read_start_report(cdir)
            if report is None or report.start_seq <= rec.starts:
                return rec
            if report.state == "starting":
                if pid_alive(report.monitor_pid):
                    return rec  # still in flight; its report will come
                self._try(
                    f"deleting container {rec.name} whose monitor died while starting it",
                    lambda: self.runtime(rec.runtime).delete(rec.id, force=True),
                )
                report = StartReport(
                    "failed",
                    report.start_seq,
                    report.monitor_pid,
                    error="the container's monitor died while starting it",
                )
            log.warning(
                "container %s: start %d %s while no daemon recorded it; folded in",
                rec.name,
                report.start_seq,
                report.state,
            )
            rec = self._fold_start(rec, report)
            if rec.status != "running":
                return rec
        exited = read_exit_record(cdir)
        if exited is not None and exited.pid == rec.pid:
            return self.store.update(
                rec.id,
                status="exited",
                exit_code=exited.exit_code,
                signal=exited.signal,
                oom_killed=exited.oom_killed,
                finished_at=exited.finished_at,
            )
        if pid_alive(rec.monitor_pid) or pid_alive(rec.pid):
            return rec
        # Both gone without a record: the monitor was killed. Say so rather than invent a code.
        self._try(
            f"deleting container {rec.name} whose monitor died",
            lambda: self.runtime(rec.runtime).delete(rec.id, force=True),
        )
        return self.store.update(
            rec.id,
            status="exited",
            finished_at=time.time(),
            error="the container's monitor died; its exit status is unknown",
        )

    def reconcile(self, wait_s: float = RECONCILE_WAIT_S) -> dict[str, int]:
        """On daemon start: fold in exits and starts that happened while no daemon ran, wait
        for starts still in flight, release image mounts no record names. Counts by status."""
        deadline = time.monotonic() + wait_s
        recs = self.list_all()
        while time.monotonic() < deadline:
            pending = [r for r in recs if self._start_in_flight(r)]
            if not pending:
                break
            time.sleep(0.05)
            recs = self.list_all()
        self.storage.release_unused_images()
        counts: dict[str, int] = {}
        for rec in recs:
            counts[rec.status] = counts.get(rec.status, 0) + 1
        return counts

    def _start_in_flight(self, rec: ContainerRecord) -> bool:
        if rec.status == "running":
            return False
        report = read_start_report(self.cdir(rec.id))
        return report is not None and report.start_seq > rec.starts and report.state == "starting"

    def _settled(self, rec: ContainerRecord) -> ContainerRecord:
        """``rec`` once a start in flight has reported (a restarted daemon's leftover)."""
        deadline = time.monotonic() + RECONCILE_WAIT_S
        while self._start_in_flight(rec) and time.monotonic() < deadline:
            time.sleep(0.02)
            rec = self.get(rec.id)
        return rec

    def get(self, ref: str) -> ContainerRecord:
        return self.refresh(self.store.get(ref))

    def list_all(self) -> list[ContainerRecord]:
        return [self.refresh(r) for r in self.store.list()]

    def describe(self, rec: ContainerRecord) -> dict[str, Any]:
        """The record as the API shows it, plus ``cgroup``: the path below each controller's
        mount (v1) or the unified root (v2), so node agents need not know the engine's layout.
        A rich-mode container also has ``services``: what its init last reported of each
        process (state, restarts, last exit), so a service that gave up is visible."""
        out = rec.to_json()
        out["cgroup"] = self.cgroups_path_of(rec)
        if rec.spec.rich and rec.spec.rich_mode == "init":
            states = read_service_states(self.cdir(rec.id) / "init")
            out["services"] = [dataclasses.asdict(s) for s in states]
        if (rec.spec.interactive or rec.spec.tty) and rec.status == "running":
            out["attach_socket"] = str(self.cdir(rec.id) / ATTACH_SOCKET)
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        rec = self.get(ref)
        out = self.describe(rec)
        out["log_path"] = str(self.cdir(rec.id) / "container.log")
        out["bundle"] = str(self.cdir(rec.id) / "bundle")
        if rec.rootfs.volume is not None and rec.rootfs.layer is not None:
            with contextlib.suppress(OSError):  # not mounted: no usage to show
                out["disk"] = volume_usage(rec.rootfs.volume)
        return out

    def logs(
        self, ref: str, offset: int = 0, limit: int = 1 << 20, *, tail_lines: int | None = None
    ) -> LogChunk:
        """Log bytes from ``offset``, or (``tail_lines``) from where the last N lines start."""
        rec = self.get(ref)
        path = self.cdir(rec.id) / "container.log"
        try:
            with open(path, "rb") as fh:
                if tail_lines is not None:
                    offset = tail_offset(fh, tail_lines)
                fh.seek(offset)
                data = fh.read(limit)
        except FileNotFoundError:
            data = b""
        return LogChunk(data, offset + len(data), rec.status == "running")

    def wait(self, ref: str, timeout_s: float | None = None) -> ContainerRecord:
        rec = self.get(ref)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.005
        while rec.status == "running":
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            rec = self.get(rec.id)
        return rec

    # --- signals, stop, exec, remove ------------------------------------------------------------

    def kill(self, ref: str, signal: str = "KILL") -> ContainerRecord:
        rec = self.get(ref)
        if rec.status != "running":
            raise ContainerStateError(f"container {rec.name} is not running ({rec.status})")
        self.runtime(rec.runtime).kill(rec.id, signal)
        return self.get(rec.id)

    def stop(self, ref: str, timeout_s: float | None = None) -> ContainerRecord:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exited record."""
        timeout = self.settings.stop_timeout_s if timeout_s is None else timeout_s
        rec = self.get(ref)
        with self._lock(rec.id):
            rec = self.get(rec.id)
            if rec.status != "running":
                return rec
            rt = self.runtime(rec.runtime)
            # Either signal may race the container's own exit; the wait below decides.
            self._try(f"SIGTERM to container {rec.name}", lambda: rt.kill(rec.id, "TERM"))
            rec = self.wait(rec.id, timeout)
            if rec.status == "running":
                refused: TidalError | None = None
                try:
                    rt.kill(rec.id, "KILL", all_processes=True)
                except TidalError as exc:
                    refused = exc
                rec = self.wait(rec.id, 30)
                if refused is not None:  # a warning only if it did not end by itself meanwhile
                    level = logging.WARNING if rec.status == "running" else logging.DEBUG
                    log.log(level, "SIGKILL to container %s: %s", rec.name, refused)
            if rec.status == "running":
                raise EngineError(f"container {rec.name} did not die after SIGKILL")
            return rec

    def exec(
        self, ref: str, argv: list[str], *, env: list[str] | None = None, stdin: bytes = b""
    ) -> ExecResult:
        rec = self.get(ref)
        if rec.status != "running":
            raise ContainerStateError(
                f"container {rec.name} is {rec.status}; exec needs a running container "
                f"(start it with 'tidal run' again or use a new one)"
            )
        if not argv:
            raise ConfigError("exec needs a command")
        spec_env = [f"{k}={v}" for k, v in rec.spec.env]
        return self.runtime(rec.runtime).exec(rec.id, argv, env=spec_env + (env or []), stdin=stdin)

    def remove(self, ref: str, *, force: bool = False) -> None:
        """Delete the container and everything it holds on the host."""
        rec = self.get(ref)
        with self._lock(rec.id):
            rec = self._settled(self.get(rec.id))
            if rec.status == "running":
                if not force:
                    raise ContainerStateError(
                        f"container {rec.name} is running; stop it first or use 'tidal rm --force'"
                    )
                self.stop(rec.id, timeout_s=0)
            self._destroy(rec)
        with self._locks_guard:
            self._locks.pop(rec.id, None)

    def _never_started(self, rec: ContainerRecord) -> bool:
        """No start was ever handed to a monitor: the runtime has never heard of it."""
        return (
            rec.status == "created"
            and rec.starts == 0
            and rec.id not in self._starting
            and read_start_report(self.cdir(rec.id)) is None
        )

    def _destroy(self, rec: ContainerRecord) -> None:
        errors: list[str] = []
        self._await_monitor_exit(rec)
        if not self._never_started(rec):  # else no runtime state: spare the runtime's process
            try:
                self.runtime(rec.runtime).delete(rec.id, force=True)
            except ConfigError as exc:  # the runtime is gone from this host: nothing to undo
                log.warning("removing container %s: %s", rec.name, exc)
            except TidalError as exc:
                errors.append(f"runtime: {exc}")
        self._fresh.discard(rec.id)
        if rec.spec.pod_sandbox:  # before the storage sweep, which would find them mounted
            try:
                self.pod_namespaces.destroy(self.pod_ns_dir(rec.id))
            except (TidalError, OSError) as exc:
                errors.append(f"pod namespaces: {exc}")
        errors += self.storage.destroy(rec.id, self.cdir(rec.id), rec.rootfs)
        if rec.spec.cri_log is not None:
            remove_cri_logs(rec.spec.cri_log, rec.id)
        if rec.spec.network == "bridge":
            try:
                self.network.destroy_netns(rec.id)
            except (TidalError, OSError) as exc:
                errors.append(f"network: {exc}")
        if errors:
            self.store.update(rec.id, error="; ".join(errors))
            raise EngineError(
                f"removing container {rec.name} left work undone: {'; '.join(errors)}; "
                "retry 'tidal rm'"
            )
        shutil.rmtree(self.cdir(rec.id), ignore_errors=True)
        self.store.delete(rec.id)
        log.info("removed container %s (%s)", rec.name, rec.id[:12])

    # --- update / upgrade -------------------------------------------------------------------

    def update(
        self,
        ref: str,
        *,
        cpus: float | None = None,
        memory_bytes: int | None = None,
        pids_limit: int | None = None,
    ) -> ContainerRecord:
        """Change limits in place (running: through the runtime; always: for later starts)."""
        rec = self.get(ref)
        with self._lock(rec.id):
            spec = rec.spec.replace(
                cpus=cpus if cpus is not None else rec.spec.cpus,
                memory_bytes=memory_bytes if memory_bytes is not None else rec.spec.memory_bytes,
                pids_limit=pids_limit if pids_limit is not None else rec.spec.pids_limit,
            )
            if rec.status == "running":
                body = resources_from(cpus, memory_bytes, pids_limit)
                if not body:
                    raise ConfigError("update needs --cpus, --memory or --pids-limit")
                every = self._pinnable_cpus(rec.runtime)
                if cpus is not None and every:  # the pinning follows the limit (or widens)
                    pinned = cpuset_for(cpus, every, rec.id)
                    body["cpu"]["cpus"] = pinned or ",".join(str(c) for c in every)
                rt = self.runtime(rec.runtime)
                if not rt.capabilities.update:
                    raise ConfigError(
                        f"runtime {rt.name} cannot change the limits of running container "
                        f"{rec.name}; stop it, 'tidal update' it, and start it again"
                    )
                if pids_limit is not None and not rt.capabilities.update_pids:
                    raise ConfigError(
                        f"runtime {rt.name} cannot change the pids limit of a running "
                        "container; stop it, update, and start it again"
                    )
                rt.update(rec.id, body)
            return self.store.update(rec.id, spec=spec)

    def upgrade(
        self,
        ref: str,
        image: str,
        command: tuple[str, ...] | None = None,
        *,
        stop_timeout_s: float | None = None,
    ) -> ContainerRecord:
        """Swap the image under a container (see :func:`tidal.engine.upgrade.upgrade`);
        ``stop_timeout_s`` as in :meth:`stop`, for stopping the old image."""
        image = resolve_image(ContainerSpec(image=image)).image
        return upgrade_mod.upgrade(self, ref, image, command, stop_timeout_s=stop_timeout_s)

    def log_tail(self, cid: str, n_bytes: int = 300) -> str:
        try:
            data = (self.cdir(cid) / "container.log").read_bytes()[-n_bytes:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip().replace("\n", " | ")
