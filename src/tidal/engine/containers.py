"""The engine: container lifecycle on top of rootfs providers, a runtime driver and the store.

:class:`Engine` is what the daemon serves. Each container has a directory
``<state>/containers/<id>/`` (bundle, rootfs mount points, quota volume, log, the monitor's
``started.json``/``exit.json``) and a row in the state database. The engine never waits on a
container itself: its monitor does (see :mod:`tidal.engine.monitor`), and every read of a
record first folds in what the monitor wrote (:meth:`Engine.refresh`), which is also how a
restarted daemon finds its containers again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.engine import network
from tidal.engine.bundle import (
    BundleInputs,
    Mount,
    bind,
    build_config,
    caps_in_mask,
    resources_from,
    rich_args,
)
from tidal.engine.bundle import write_bundle as write_bundle_file
from tidal.engine.hostprep import prepare_hybrid_cgroups
from tidal.engine.lxcfs import LxcfsSupervisor
from tidal.engine.lxcfs import available as lxcfs_available
from tidal.engine.richinit import prepare_init_dir
from tidal.engine.rootfs import (
    ImageConfig,
    create_quota_base,
    destroy_volume_of,
    ensure_rootfs_mounted,
    lower_mountpoint,
    mount_rootfs,
    provider_for,
    release_lower,
    unmount_overlay,
)
from tidal.engine.runtime import ExecResult, Runtime, get_runtime, pid_alive
from tidal.engine.settings import EngineSettings, load_settings
from tidal.engine.spec import ContainerSpec, QuotaSpec
from tidal.engine.store import ContainerRecord, Store
from tidal.engine.volume import (
    QuotaVolume,
    VolumePool,
    create_volume,
    destroy_volume,
    mount_volume,
    volume_usage,
)
from tidal.errors import (
    ConfigError,
    ContainerStateError,
    EngineError,
    OciRuntimeError,
    TidalError,
)
from tidal.fsutil import read_line

log = logging.getLogger(__name__)
MONITOR_READY_TIMEOUT_S = 60.0
MONITOR_EXIT_WAIT_S = 10.0
"""How long ``rm`` waits for an exited container's monitor to finish its cleanup."""


class MonitorLaunch:
    """A monitor interpreter started ahead of time, waiting for its configuration."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_fd: int) -> None:
        self.proc = proc
        self.ready_fd = ready_fd
        self._fd_open = True

    def close_fd(self) -> None:
        if self._fd_open:
            os.close(self.ready_fd)
            self._fd_open = False

    def abort(self) -> None:
        """EOF on its stdin makes the (forked) monitor exit without doing anything."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.close_fd()


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    running: bool


class Engine:
    """Container lifecycle. Thread-safe: one lock per container, one for creation."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or load_settings()
        self.state_dir = self.settings.resolved_state_dir()
        self.containers_dir = self.state_dir / "containers"
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "state.db")
        self.lxcfs = LxcfsSupervisor(self.state_dir / "lxcfs" / "mnt")
        self._create_lock = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._runtimes: dict[str, Runtime] = {}
        self.images_dir = self.state_dir / "images"
        self._image_locks: dict[str, threading.Lock] = {}
        default = self._root_quota_default()
        self.volume_pool = VolumePool(
            self.state_dir / "pool",
            default.size_bytes if default else 0,
            (default.inodes or 0) if default else 0,
            self.settings.volume_pool_size if default else 0,
        )
        self._refill_wanted = threading.Event()
        self._closing = threading.Event()
        self._refiller: threading.Thread | None = None
        self._hostprep_done = False

    def close(self) -> None:
        """Stop the pool refiller and close the database (containers keep running)."""
        self._closing.set()
        self._refill_wanted.set()
        if self._refiller is not None:
            self._refiller.join()
            self._refiller = None
        self.store.close()

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

    def _image_lock(self, mountpoint: Path) -> threading.Lock:
        """Serialises mounting and releasing one shared image mount."""
        with self._locks_guard:
            return self._image_locks.setdefault(str(mountpoint), threading.Lock())

    def _lower_mp(self, image: str) -> Path:
        return lower_mountpoint(self.images_dir, image)

    def _release_lower_if_unused(self, state: dict[str, Any], except_id: str | None) -> None:
        """Unmount a shared image mount when no container in the database still uses it."""
        if not state or "lower_mountpoint" not in state:
            return
        mp = state["lower_mountpoint"]
        with self._image_lock(Path(mp)):
            for other in self.store.list():
                if other.id != except_id and other.rootfs.get("lower_mountpoint") == mp:
                    return
            release_lower(state)

    def _mount_rootfs(
        self, cid: str, image: str, volume: dict[str, Any] | None, generation: int
    ) -> dict[str, Any]:
        mp = self._lower_mp(image)
        try:
            with self._image_lock(mp):
                return mount_rootfs(self.cdir(cid), image, volume, mp, generation)
        except BaseException:
            probe = {"kind": provider_for(image).kind, "lower_mountpoint": str(mp)}
            with contextlib.suppress(TidalError):
                self._release_lower_if_unused(probe, except_id=cid)
            raise

    def runtime(self, name: str) -> Runtime:
        if name not in self._runtimes:
            rt = get_runtime(name, self.state_dir)
            if rt.capabilities.hybrid_cgroups_need_empty_v2 and not self._hostprep_done:
                prepare_hybrid_cgroups()
                self._hostprep_done = True
            self._runtimes[name] = rt
        return self._runtimes[name]

    def cdir(self, cid: str) -> Path:
        return self.containers_dir / cid

    def cgroups_path(self, cid: str) -> str:
        return f"/{self.settings.cgroup_parent}/{cid}"

    def _lxcfs_wanted(self, spec: ContainerSpec) -> bool:
        if spec.lxcfs is not None:
            return spec.lxcfs
        return self.settings.lxcfs != "off" and lxcfs_available()

    # --- create / start ----------------------------------------------------------------------

    def run(self, spec: ContainerSpec) -> ContainerRecord:
        """Create and start; a failed start removes the container again (nothing leaks)."""
        launch = self._launch_monitor()
        try:
            rec = self.create(spec)
        except BaseException:
            launch.abort()
            raise
        try:
            return self.start(rec.id, launch=launch)
        except BaseException:
            launch.abort()
            with contextlib.suppress(TidalError):
                self.remove(rec.id, force=True)
            raise

    def create(self, spec: ContainerSpec) -> ContainerRecord:
        """Record the container, mount its rootfs and volumes, set up its network."""
        cid = secrets.token_hex(32)
        runtime_name = spec.runtime or self.settings.runtime
        self.runtime(runtime_name)  # fail early on a missing runtime
        provider_for(spec.image)  # fail early on a missing image
        if spec.lxcfs and not lxcfs_available():
            raise ConfigError(
                "--lxcfs needs the lxcfs binary and /dev/fuse (apt-get install lxcfs)"
            )
        self._check_ports(spec, cid)
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
            self._prepare_storage(cid, spec)
            if spec.network == "bridge":
                network.ensure_bridge(self.settings.bridge, self.settings.subnet)
                ip = self.store.allocate_ip(cid, network.ip_candidates(self.settings.subnet))
                network.create_netns(cid, ip, self.settings.subnet, self.settings.bridge)
                rec = self.store.update(cid, ip=ip)
        except BaseException:
            with contextlib.suppress(TidalError):
                self._destroy(self.store.get(cid))
            raise
        log.info("created container %s (%s) from %s", rec.name, cid[:12], spec.image)
        return self.store.get(cid)

    def _root_quota(self, spec: ContainerSpec) -> QuotaSpec | None:
        for q in spec.disk_quotas:
            if q.target == "/":
                return q
        return self._root_quota_default()

    def _root_quota_default(self) -> QuotaSpec | None:
        size = self.settings.default_disk_quota_bytes
        if size <= 0:
            return None
        return QuotaSpec("/", size, max(size // self.settings.bytes_per_inode, 64))

    def _prepare_storage(self, cid: str, spec: ContainerSpec) -> None:
        """Quota volume, overlay, volumes; each step recorded at once so that a failure in a
        later one (or a crash) leaves a state that ``rm`` can undo."""
        cdir = self.cdir(cid)
        volume = create_quota_base(cdir, self._root_quota(spec), self.volume_pool)
        self._want_refill()
        if volume is not None:
            self.store.update(cid, rootfs={"volume": volume})
        state = self._mount_rootfs(cid, spec.image, volume, 0)
        state["volumes"] = []
        self.store.update(cid, rootfs=state)
        quotas = {q.target: q for q in spec.disk_quotas}
        for i, vol in enumerate(spec.volumes):
            entry: dict[str, Any] = {"target": vol.target, "source": vol.source, "volume": None}
            if vol.source is None:
                path = cdir / "volumes" / str(i)
                q = quotas.get(vol.target)
                if q is not None:
                    qv = create_volume(
                        cdir / "volumes" / f"{i}.img",
                        path,
                        q.size_bytes,
                        q.inodes or q.size_bytes // self.settings.bytes_per_inode,
                    )
                    entry["volume"] = qv.__dict__.copy()
                else:
                    path.mkdir(parents=True, exist_ok=True)
                entry["path"] = str(path)
            else:
                if not Path(vol.source).exists():
                    raise ConfigError(f"volume source {vol.source} does not exist on this host")
                entry["path"] = vol.source
            state["volumes"].append(entry)
            self.store.update(cid, rootfs=state)

    def _check_ports(self, spec: ContainerSpec, cid: str) -> None:
        if not spec.ports:
            return
        for other in self.store.list():
            if other.id == cid:
                continue
            for p in other.spec.ports:
                for mine in spec.ports:
                    if p.host_port == mine.host_port and p.protocol == mine.protocol:
                        raise ConfigError(
                            f"host port {mine.host_port}/{mine.protocol} is already published by "
                            f"container {other.name} ({other.id[:12]}); choose another --publish"
                        )
        for mine in spec.ports:
            if not network.host_port_free(mine.host_ip, mine.host_port):
                raise ConfigError(
                    f"host port {mine.host_ip}:{mine.host_port} is in use by another process "
                    "on this host; choose another --publish"
                )

    def _command(self, rec: ContainerRecord, image_cfg: ImageConfig) -> tuple[str, ...]:
        argv = rec.spec.command or image_cfg.default_command
        if not argv:
            raise ConfigError(
                f"image {rec.spec.image} has no default command; give one: tidal run IMAGE -- CMD"
            )
        return argv

    def _bundle(self, rec: ContainerRecord) -> Path:
        spec, cdir = rec.spec, self.cdir(rec.id)
        image_cfg = provider_for(spec.image).image_config(spec.image)
        image_init = spec.rich and spec.rich_mode == "systemd"
        argv = () if image_init else self._command(rec, image_cfg)
        init_dir = None
        if spec.rich:
            if spec.rich_mode == "init":
                init_dir = str(prepare_init_dir(cdir / "init", self.state_dir / "bin", spec, argv))
            argv = rich_args(spec, argv)
        lxcfs_dir: str | None = None
        lxcfs_files: tuple[str, ...] = ()
        if self._lxcfs_wanted(spec):
            self.lxcfs.ensure()
            lxcfs_dir, lxcfs_files = str(self.lxcfs.proc_dir), self.lxcfs.files()
        mounts: list[Mount] = []
        for vol_state, vol in zip(rec.rootfs.get("volumes", []), spec.volumes, strict=False):
            mounts.append(bind(vol_state["path"], vol.target, readonly=vol.readonly))
        inputs = BundleInputs(
            container_id=rec.id,
            rootfs=rec.rootfs["merged"],
            args=argv,
            cgroups_path=self.cgroups_path(rec.id),
            netns_path=network.netns_path(rec.id) if spec.network == "bridge" else None,
            mounts=tuple(mounts),
            lxcfs_proc_dir=lxcfs_dir,
            lxcfs_files=lxcfs_files,
            init_dir=init_dir,
            image_env=image_cfg.env,
            image_workdir=image_cfg.workdir,
            nofile_limit=_nofile_hard_limit(),
            host_caps=_host_bounding_caps(),
        )
        bundle_dir = cdir / "bundle"
        write_bundle_file(bundle_dir, build_config(spec, inputs))
        return bundle_dir

    def _ensure_storage(self, rec: ContainerRecord) -> None:
        with self._image_lock(Path(rec.rootfs["lower_mountpoint"])):
            ensure_rootfs_mounted(rec.rootfs)
        for vol in rec.rootfs.get("volumes", []):
            if vol.get("volume"):
                mount_volume(QuotaVolume(**vol["volume"]))
        if (
            rec.spec.network == "bridge"
            and rec.ip
            and not Path(network.netns_path(rec.id)).exists()
        ):
            # after a host reboot: the same address again, on a recreated bridge
            network.ensure_bridge(self.settings.bridge, self.settings.subnet)
            network.create_netns(rec.id, rec.ip, self.settings.subnet, self.settings.bridge)

    def start(self, ref: str, *, launch: MonitorLaunch | None = None) -> ContainerRecord:
        """Start a created or exited container through a new monitor."""
        rec = self.get(ref)
        with self._lock(rec.id):
            rec = self.refresh(self.store.get(rec.id))
            if rec.status == "running":
                raise ContainerStateError(f"container {rec.name} is already running")
            self._ensure_storage(rec)
            bundle = self._bundle(rec)
            ready = self._spawn_monitor(rec, bundle, launch)
            if not ready.get("ok"):
                msg = str(ready.get("error") or "monitor gave no reason")
                self.store.update(rec.id, status="exited", error=msg)
                raise OciRuntimeError(f"container {rec.name} did not start: {msg}")
            return self.store.update(
                rec.id,
                status="running",
                pid=int(ready["pid"]),
                monitor_pid=int(ready["monitor_pid"]),
                started_at=float(ready["started_at"]),
                finished_at=None,
                exit_code=None,
                signal=None,
                oom_killed=False,
                error=None,
                starts=rec.starts + 1,
            )

    def _monitor_conf(self, rec: ContainerRecord, bundle: Path) -> dict[str, Any]:
        rt = self.runtime(rec.runtime)
        cdir = self.cdir(rec.id)
        runtime_log = cdir / "runtime.log"
        with contextlib.suppress(FileNotFoundError):
            runtime_log.unlink()
        cg = self.cgroups_path(rec.id)
        return {
            "id": rec.id,
            "runtime": rt.name,
            "create_argv": rt.create_argv(rec.id, bundle, cdir / "pid", runtime_log),
            "start_argv": [*rt.global_args(), "start", rec.id],
            "delete_argv": [*rt.global_args(), "delete"],
            "log_path": str(cdir / "container.log"),
            "runtime_log": str(runtime_log),
            "pid_file": str(cdir / "pid"),
            "exit_path": str(cdir / "exit.json"),
            "started_path": str(cdir / "started.json"),
            "oom_files": [
                f"/sys/fs/cgroup/memory{cg}/memory.oom_control",
                f"/sys/fs/cgroup{cg}/memory.events",
            ],
            "ports": [
                {
                    "host_ip": p.host_ip,
                    "host_port": p.host_port,
                    "container_port": p.container_port,
                    "target_ip": rec.ip,
                }
                for p in rec.spec.ports
            ],
        }

    def _launch_monitor(self) -> MonitorLaunch:
        """Start a monitor's interpreter now; it waits for its configuration on stdin.

        Python's start-up (tens of ms) then overlaps the storage set-up instead of adding
        to it: this is the largest single item of the engine's start latency.
        """
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-m", "tidal.engine.monitor", "-", str(w)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(w,),
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": _package_root()},
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        return MonitorLaunch(proc, r)

    def _spawn_monitor(
        self, rec: ContainerRecord, bundle: Path, launch: MonitorLaunch | None
    ) -> dict[str, Any]:
        cdir = self.cdir(rec.id)
        conf = self._monitor_conf(rec, bundle)
        conf["monitor_log"] = str(cdir / "monitor.log")
        (cdir / "monitor.json").write_text(json.dumps(conf))
        launch = launch or self._launch_monitor()
        try:
            assert launch.proc.stdin is not None
            launch.proc.stdin.write(json.dumps(conf).encode())
            launch.proc.stdin.close()
            launch.proc.wait(timeout=30)  # the first fork returns at once
            line = read_line(launch.ready_fd, MONITOR_READY_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            launch.abort()
            return {"ok": False, "error": f"monitor did not take its configuration: {exc}"}
        finally:
            launch.close_fd()
        if not line:
            try:
                tail = (cdir / "monitor.log").read_text(errors="replace").strip()[-1000:]
            except OSError:
                tail = ""
            return {"ok": False, "error": f"monitor exited without a report: {tail or 'no log'}"}
        result: dict[str, Any] = json.loads(line)
        return result

    # --- observing ---------------------------------------------------------------------------

    def refresh(self, rec: ContainerRecord) -> ContainerRecord:
        """Fold in what the monitor recorded since; decide about lost monitors."""
        if rec.status != "running":
            return rec
        cdir = self.cdir(rec.id)
        exit_path = cdir / "exit.json"
        try:
            data = json.loads(exit_path.read_text())
        except (OSError, ValueError):
            data = None
        if data is not None and data.get("pid") == rec.pid:
            return self.store.update(
                rec.id,
                status="exited",
                exit_code=data.get("exit_code"),
                signal=data.get("signal"),
                oom_killed=bool(data.get("oom_killed")),
                finished_at=data.get("finished_at"),
            )
        if pid_alive(rec.monitor_pid) or pid_alive(rec.pid):
            return rec
        # Both gone without a record: the monitor was killed. Say so rather than invent a code.
        with contextlib.suppress(TidalError):
            self.runtime(rec.runtime).delete(rec.id, force=True)
        return self.store.update(
            rec.id,
            status="exited",
            finished_at=time.time(),
            error="the container's monitor died; its exit status is unknown",
        )

    def get(self, ref: str) -> ContainerRecord:
        return self.refresh(self.store.get(ref))

    def list_all(self) -> list[ContainerRecord]:
        return [self.refresh(r) for r in self.store.list()]

    def describe(self, rec: ContainerRecord) -> dict[str, Any]:
        """The record as the API shows it, plus ``cgroup``: the path below each controller's
        mount (v1) or the unified root (v2), so node agents need not know the engine's layout."""
        out = rec.to_json()
        out["cgroup"] = self.cgroups_path(rec.id)
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        rec = self.get(ref)
        out = self.describe(rec)
        out["log_path"] = str(self.cdir(rec.id) / "container.log")
        out["bundle"] = str(self.cdir(rec.id) / "bundle")
        if rec.rootfs.get("volume") and rec.rootfs.get("merged"):
            with contextlib.suppress(OSError):
                out["disk"] = volume_usage(QuotaVolume(**rec.rootfs["volume"]))
        return out

    def logs(self, ref: str, offset: int = 0, limit: int = 1 << 20) -> LogChunk:
        rec = self.get(ref)
        path = self.cdir(rec.id) / "container.log"
        try:
            with open(path, "rb") as fh:
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
            with contextlib.suppress(TidalError):
                rt.kill(rec.id, "TERM")
            rec = self.wait(rec.id, timeout)
            if rec.status == "running":
                with contextlib.suppress(TidalError):
                    rt.kill(rec.id, "KILL", all_processes=True)
                rec = self.wait(rec.id, 30)
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
            rec = self.get(rec.id)
            if rec.status == "running":
                if not force:
                    raise ContainerStateError(
                        f"container {rec.name} is running; stop it first or use 'tidal rm --force'"
                    )
                self.stop(rec.id, timeout_s=0)
            self._destroy(rec)
        with self._locks_guard:
            self._locks.pop(rec.id, None)

    def _destroy(self, rec: ContainerRecord) -> None:
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except (TidalError, OSError) as exc:
                errors.append(f"{what}: {exc}")

        # An exited container's monitor may still be running the runtime's delete (and the
        # poststop hooks); let it finish rather than race it for the same cgroups and mounts.
        deadline = time.monotonic() + MONITOR_EXIT_WAIT_S
        while rec.monitor_pid and pid_alive(rec.monitor_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(TidalError):
            self.runtime(rec.runtime).delete(rec.id, force=True)
        for vol in rec.rootfs.get("volumes", []):
            if vol.get("volume"):
                attempt("volume", destroy_volume, QuotaVolume(**vol["volume"]))
        if rec.rootfs.get("merged"):
            attempt("rootfs", unmount_overlay, rec.rootfs)
            attempt("image", self._release_lower_if_unused, rec.rootfs, rec.id)
        attempt("rootfs volume", destroy_volume_of, rec.rootfs)
        if rec.spec.network == "bridge":
            attempt("network", network.destroy_netns, rec.id)
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
                self.runtime(rec.runtime).update(rec.id, body)
            return self.store.update(rec.id, spec=spec)

    def upgrade(
        self, ref: str, image: str, command: tuple[str, ...] | None = None
    ) -> ContainerRecord:
        """Swap the image under a container, keeping id, name, volumes, IP, quota, limits.

        Command precedence: ``command``, else the old container's own, else the new image's.
        The old image and writable layer are kept until the new one has run for the probe
        period; any failure restores them, restarts the old container and raises.
        """
        rec = self.get(ref)
        provider_for(image)  # fail before stopping anything
        with self._lock(rec.id):
            rec = self.get(rec.id)
            was_running = rec.status == "running"
            if was_running:
                rec = self.stop(rec.id)
            old_state = rec.rootfs
            old_spec = rec.spec
            new_spec = old_spec.replace(image=image, command=command or old_spec.command)
            gen = int(old_state.get("generation", 0)) + 1
            unmount_overlay(old_state)
            new_state: dict[str, Any] | None = None
            try:
                new_state = self._mount_rootfs(rec.id, image, old_state.get("volume"), gen)
                new_state["volumes"] = old_state.get("volumes", [])
                rec = self.store.update(rec.id, rootfs=new_state, spec=new_spec)
                self.start(rec.id)
                rec = self.wait(rec.id, self.settings.upgrade_probe_s)
                if rec.status != "running" and rec.exit_code != 0:
                    raise EngineError(
                        f"it exited with status {rec.exit_code} within "
                        f"{self.settings.upgrade_probe_s}s: {self._log_tail(rec.id)}"
                    )
            except TidalError as exc:
                self._rollback(rec.id, old_state, old_spec, was_running, new_state)
                raise EngineError(
                    f"upgrade of container {rec.name} to {image} failed ({exc}); rolled back to "
                    f"{old_spec.image}" + (" and restarted it" if was_running else "")
                ) from exc
            drop_layer_dirs(old_state)
            self._release_lower_if_unused(old_state, except_id=None)
            return rec

    def _rollback(
        self,
        cid: str,
        old_state: dict[str, Any],
        old_spec: ContainerSpec,
        was_running: bool,
        new_state: dict[str, Any] | None,
    ) -> None:
        """Put the old image and writable layer back; drop only what the upgrade made."""
        rec = self.get(cid)
        if rec.status == "running":
            self.stop(cid, timeout_s=2)
        self.store.update(cid, rootfs=old_state, spec=old_spec)
        if new_state is not None:
            with contextlib.suppress(TidalError):
                unmount_overlay(new_state, drop_layer=True)
            with contextlib.suppress(TidalError):
                self._release_lower_if_unused(new_state, except_id=None)
        if was_running:
            self.start(cid)

    def _log_tail(self, cid: str, n_bytes: int = 300) -> str:
        try:
            data = (self.cdir(cid) / "container.log").read_bytes()[-n_bytes:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip().replace("\n", " | ")


def drop_layer_dirs(old_state: dict[str, Any]) -> None:
    """After a successful upgrade: drop the old generation's layer directories."""
    for key in ("upper", "work"):
        shutil.rmtree(old_state[key], ignore_errors=True)


def _nofile_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def _host_bounding_caps() -> frozenset[str] | None:
    """The daemon's capability bounding set (a container cannot get what the host lacks)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                return caps_in_mask(int(line.split()[1], 16))
    except OSError:
        pass
    return None


def _package_root() -> str:
    """The directory holding the ``tidal`` package, so the monitor imports this same code."""
    import tidal

    return str(Path(tidal.__file__).resolve().parent.parent)
