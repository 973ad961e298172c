"""Mount an image: FUSE server -> ``<run>/fuse/disk`` -> loop device -> ext4 at the target.

Each mount is recorded as JSON under ``$TIDAL_DATA_ROOT/mounts/`` before anything is attached,
so another process (the CLI after the engine, or a restart) can undo it, and so that a loop
device backed by a file under that directory with no record is known to be an orphan.

Unmount undoes the steps in reverse: umount ext4 -> detach loop -> ``fusermount3 -u`` (the
server flushes its writable layer and exits) -> reap the server. It also works after the FUSE
server died (``kill -9``): the ext4 and FUSE mounts are then dropped lazily where they are
busy, the loop device is detached, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tidal.blobs.pulled import is_pulled_image
from tidal.blockdev import ext4, loop
from tidal.blockdev.ext4 import Ext4Format
from tidal.blockdev.fuse_ll import DISK_NAME
from tidal.blockdev.settings import BlockdevSettings, load_settings
from tidal.config import data_root
from tidal.errors import FuseServerError, MountError, MountNotFoundError, TidalError
from tidal.fsutil import read_line, write_text_atomic
from tidal.image.manifest import LAYER_KIND_TRACE, Image
from tidal.proc import run, spawn

if TYPE_CHECKING:
    from tidal.blockdev.fdstore import FdStore

log = logging.getLogger(__name__)

FUSE3 = "apt-get install fuse3"
STATS_FILE = "stats.json"
"""In the mount's run directory; the server rewrites it every second and at exit."""

_SERVERS: dict[int, subprocess.Popen[bytes]] = {}
"""Servers this process started, kept so they can be reaped (no zombies, no ResourceWarning)."""


@dataclass(frozen=True)
class MountInfo:
    """A mounted image, as recorded in ``$TIDAL_DATA_ROOT/mounts/<key>.json``."""

    target: str
    image_dir: str
    writable_dir: str | None
    readonly: bool
    fuse_dir: str
    server_pid: int
    loop_device: str | None
    created_at: float
    key: str
    owner: str | None = None
    """``PID:START`` of the process this mount serves (a build), or None (a user's mount,
    which lives until unmounted). Its server exits when the owner dies, and gc tears down
    what a dead owner left."""
    loop_backing_id: str | None = None
    """The loop device's backing file as ``MAJ:MIN:INODE`` (see ``LoopDevice.backing_id``):
    after the FUSE server is gone the file's path no longer resolves, and this is how
    teardown still knows the device is this mount's."""
    server_id: str | None = None
    """``PID:START`` of the process serving the FUSE disk when that is not a per-mount server
    of its own (the node service, which serves many mounts): ``server_pid`` alone would not
    tell a recycled pid from it."""
    fd_name: str | None = None
    """The mount's FUSE connection in the node's fd store (:mod:`tidal.blockdev.fdstore`):
    set when the node service serves it. The connection then outlives the service: while the
    service is down the mount is *suspended* (reads wait, nothing fails), and the next
    service resumes it. Such a mount is torn down only by asking, never by gc."""

    @property
    def disk_file(self) -> str:
        return f"{self.fuse_dir}/{DISK_NAME}"

    @property
    def run_dir(self) -> Path:
        return Path(self.fuse_dir).parent

    @property
    def log_file(self) -> Path:
        return self.run_dir / "server.log"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MountInfo:
        return cls(**json.loads(text))


def state_dir() -> Path:
    return data_root() / "mounts"


def fdstore_path() -> Path:
    """The socket of the fd store that keeps node-served mounts' FUSE connections."""
    return data_root() / "fdstore.sock"


def running_fdstore() -> FdStore | None:
    """The node's fd store if its holder runs (nothing is started)."""
    from tidal.blockdev.fdstore import FdStore

    store = FdStore(fdstore_path())
    return store if store.alive() else None


def mount_key(target: Path) -> str:
    return hashlib.sha256(str(target).encode()).hexdigest()[:16]


def _record_path(key: str) -> Path:
    return state_dir() / f"{key}.json"


def save_record(info: MountInfo) -> None:
    """Rewrite a mount's record (the node service moves a resumed mount onto itself)."""
    write_text_atomic(_record_path(info.key), info.to_json())


def _load(key: str) -> MountInfo | None:
    try:
        return MountInfo.from_json(_record_path(key).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError) as exc:
        raise MountError(
            f"mount record {_record_path(key)} is unreadable ({exc}); remove it by hand"
        ) from exc


def list_mounts() -> list[MountInfo]:
    """Every mount recorded on this node (including ones whose server has died)."""
    d = state_dir()
    if not d.is_dir():
        return []
    found = []
    for path in sorted(d.glob("*.json")):
        info = _load(path.stem)
        if info is not None:
            found.append(info)
    return found


def server_alive(info: MountInfo) -> bool:
    """Whether the FUSE server of ``info`` still runs (a zombie counts as dead)."""
    if info.server_id is not None:
        return process_identity(info.server_pid) == info.server_id
    return _server_pid_alive(info.server_pid)


def suspended(info: MountInfo) -> bool:
    """A node-served mount whose service is down but whose FUSE connection the fd store keeps:
    it resumes when the service starts again (so gc leaves it alone)."""
    if info.fd_name is None or server_alive(info):
        return False
    store = running_fdstore()
    return store is not None and info.fd_name in store.names()


def process_identity(pid: int) -> str | None:
    """``PID:START`` (start time in clock ticks since boot, /proc/PID/stat field 22): names one
    process even after its pid is reused; None if no such process (or a zombie)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[-1].split()
    if not fields or fields[0] == "Z":
        return None
    return f"{pid}:{fields[19]}"


def owner_alive(info: MountInfo) -> bool:
    """Whether the process a build mount serves still runs (True for user mounts)."""
    if info.owner is None:
        return True
    pid = int(info.owner.partition(":")[0])
    return process_identity(pid) == info.owner


def _server_pid_alive(pid: int) -> bool:
    proc = _SERVERS.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # a recycled pid is not our server: check what runs there
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z" and b"tidal.blockdev.serve" in cmdline


# --- who serves the FUSE disk ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerRef:
    """The server of one mount's FUSE disk, as its record keeps it."""

    pid: int
    server_id: str | None = None
    fd_name: str | None = None


@dataclass(frozen=True)
class ServeRequest:
    """What to serve at a mount's ``fuse_dir/disk``: the image, over a writable layer or not."""

    image_dir: Path
    fuse_dir: Path
    writable_dir: Path | None
    run_dir: Path
    settings: BlockdevSettings
    trace_out: Path | None = None
    owner: str | None = None
    warm_page_cache: bool = False
    """Push the image's trace into the disk's page cache (:func:`warms_page_cache`)."""


def warms_page_cache(
    image: Image, readonly: bool, settings: BlockdevSettings, *, recording: bool = False
) -> bool:
    """Whether a mount's server pushes the trace into the FUSE disk's page cache (and so its
    loop device reads without direct I/O): ``[blockdev] warm_page_cache``, a read-only mount
    of a pulled image that carries a trace, not recording one. Decided here once per mount,
    for the server and the loop device alike (``tidal.blockdev.warm``)."""
    return (
        settings.warm_page_cache
        and readonly
        and not recording
        and is_pulled_image(image.path)
        and any(rec.kind == LAYER_KIND_TRACE for rec in image.manifest.layers)
    )


class FuseServing(Protocol):
    """Who serves a mount's ``<fuse_dir>/disk``: a process per mount (:class:`ProcessServing`,
    the default) or the node service's threads (:class:`tidal.node.mounts.NodeServing`)."""

    def start(self, req: ServeRequest) -> ServerRef:
        """Serve the image's device at ``req.fuse_dir/disk``; return once it is served."""
        ...

    def stop(self, info: MountInfo, *, timeout_s: float) -> None:
        """Stop serving ``info`` after its FUSE mount is gone (flushes a writable layer)."""
        ...


class ProcessServing:
    """One ``python -m tidal.blockdev.serve`` per mount, in its own session (so the caller may
    exit); a crash takes down one mount."""

    def start(self, req: ServeRequest) -> ServerRef:
        proc = _start_server(
            req.image_dir,
            req.fuse_dir,
            req.writable_dir,
            req.run_dir / "server.log",
            req.settings,
            stats_file=req.run_dir / STATS_FILE,
            trace_out=req.trace_out,
            owner=req.owner,
            warm_page_cache=req.warm_page_cache,
        )
        return ServerRef(proc.pid)

    def stop(self, info: MountInfo, *, timeout_s: float) -> None:
        _stop_server(info.server_pid, timeout_s=timeout_s)


# --- mount ---------------------------------------------------------------------------------


def mount_image(
    image_dir: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    writable_dir: str | os.PathLike[str] | None = None,
    format_ext4: Ext4Format | None = None,
    settings: BlockdevSettings | None = None,
    trace_out: str | os.PathLike[str] | None = None,
    ext4_options: str | None = None,
    owner_pid: int | None = None,
    serving: FuseServing | None = None,
) -> MountInfo:
    """Mount the image's ext4 at ``target``, read-only, or read-write over ``writable_dir``.

    A pulled image (``tidal image pull``) is served lazily from its registry. ``format_ext4``
    makes a fresh filesystem on the device first: only the builder does that. ``trace_out``
    records every range the mount reads into a trace file, written when it is unmounted.
    ``ext4_options`` replace the default mount options (the builder adds ``nodelalloc``).
    ``owner_pid``: the mount serves that process only (a build): its server exits when the
    owner dies, and :func:`cleanup_stale` tears down what is left. ``serving``: who serves
    the FUSE disk (default: a process of its own).
    On any failure every step already taken is undone before the error propagates.
    """
    settings = settings or load_settings()
    image_path = Path(image_dir).resolve()
    target_path = Path(target).resolve()
    image = Image.open(image_path)  # validates before anything is started
    if image.manifest.fs_type != "ext4" and format_ext4 is None:
        raise MountError(
            f"image {image_path} holds a {image.manifest.fs_type!r} filesystem; only ext4 mounts"
        )
    readonly = writable_dir is None
    if readonly and format_ext4 is not None:
        raise MountError("formatting needs a writable layer (writable_dir)")
    target_path.mkdir(parents=True, exist_ok=True)
    key = mount_key(target_path)
    old = _load(key)
    if old is not None:
        if suspended(old):
            raise MountError(
                f"{target_path} has image {old.image_dir} mounted, suspended until the node "
                "service is back; start `tidal node serve`, or `tidal image umount --force` it"
            )
        if ext4.is_mountpoint(target_path) and server_alive(old):
            raise MountError(
                f"{target_path} already has image {old.image_dir} mounted; "
                f"run `tidal image umount {target_path}` first"
            )
        log.warning(
            "recovering %s: the previous mount is gone or its server died; tearing it down",
            target_path,
        )
        _teardown(old, force=True)
    elif ext4.is_mountpoint(target_path):
        raise MountError(f"{target_path} is already a mount point; choose an empty directory")
    _sweep_orphans()
    wdir = Path(writable_dir).resolve() if writable_dir is not None else None
    if wdir is not None:
        for other in list_mounts():
            if other.writable_dir == str(wdir):
                raise MountError(
                    f"writable layer {wdir} is already in use by the mount at {other.target}; "
                    "two servers appending to one layer would corrupt it"
                )

    run_dir = state_dir() / key
    fuse_dir = run_dir / "fuse"
    fuse_dir.mkdir(parents=True, exist_ok=True)
    owner = process_identity(owner_pid) if owner_pid is not None else None
    serving = serving or ProcessServing()
    warm = warms_page_cache(image, readonly, settings, recording=trace_out is not None)
    try:
        server = serving.start(
            ServeRequest(
                image_path,
                fuse_dir,
                wdir,
                run_dir,
                settings,
                trace_out=Path(trace_out).resolve() if trace_out is not None else None,
                owner=owner,
                warm_page_cache=warm,
            )
        )
    except BaseException:
        if not ext4.is_mountpoint(fuse_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    info = MountInfo(
        target=str(target_path),
        image_dir=str(image_path),
        writable_dir=str(wdir) if wdir else None,
        readonly=readonly,
        fuse_dir=str(fuse_dir),
        server_pid=server.pid,
        loop_device=None,
        created_at=time.time(),
        key=key,
        owner=owner,
        server_id=server.server_id,
        fd_name=server.fd_name,
    )
    save_record(info)
    try:
        dev = loop.attach(
            fuse_dir / DISK_NAME,
            readonly=readonly,
            direct_io=settings.loop_direct_io and not warm,  # a push needs the page cache
        )
        info = replace(info, loop_device=dev.device, loop_backing_id=dev.backing_id or None)
        save_record(info)
        if settings.loop_read_ahead_kb is not None:
            loop.set_read_ahead(dev.device, settings.loop_read_ahead_kb)
        if format_ext4 is not None:
            ext4.mkfs(dev.device, format_ext4)
        ext4.mount(dev.device, target_path, readonly=readonly, options=ext4_options)
    except BaseException:
        try:
            _teardown(info, force=True, serving=serving)
        except TidalError as exc:
            log.warning("undoing the failed mount at %s: %s", target_path, exc)
        raise
    log.info("mounted %s at %s via %s", image_path, target_path, info.loop_device)
    return info


def _start_server(
    image_dir: Path,
    fuse_dir: Path,
    writable_dir: Path | None,
    log_file: Path,
    settings: BlockdevSettings,
    *,
    stats_file: Path | None = None,
    trace_out: Path | None = None,
    owner: str | None = None,
    warm_page_cache: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``tidal.blockdev.serve`` in its own session and wait for its ready line."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "tidal.blockdev.serve", str(image_dir), str(fuse_dir)]
    cmd += ["--ready-fd", str(w), "--max-io-bytes", str(settings.max_io_bytes)]
    if stats_file is not None:
        cmd += ["--stats-file", str(stats_file)]
    if trace_out is not None:
        cmd += ["--trace-out", str(trace_out)]
    if writable_dir is not None:
        cmd += ["--writable", str(writable_dir)]
    if owner is not None:
        cmd += ["--owner", owner]
    if warm_page_cache:
        cmd.append("--warm-page-cache")
    try:
        with log_file.open("ab") as log_fh:
            # A long-lived child that must outlive this call: spawned, not run.
            proc = spawn(
                cmd,
                what=f"starting the FUSE server for {image_dir}",
                error=FuseServerError,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                pass_fds=(w,),
                start_new_session=True,  # survives the caller (a CLI that exits)
            )
    finally:
        os.close(w)
    _SERVERS[proc.pid] = proc
    try:
        line = read_line(r, settings.ready_timeout_s)
    finally:
        os.close(r)
    if line == "ready":
        return proc
    _stop_server(proc.pid, timeout_s=5)
    if ext4.is_mountpoint(fuse_dir):
        _fuse_unmount(fuse_dir, lazy=True)
    why = line.removeprefix("error: ") if line else _log_tail(log_file)
    raise FuseServerError(
        f"FUSE server for image {image_dir} did not become ready within "
        f"{settings.ready_timeout_s:.0f} s: {why or 'no message'} (log: {log_file})"
    )


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _sweep_orphans() -> list[str]:
    """Detach loop devices left by a process that died between attach and record."""
    d = state_dir()
    if not d.is_dir():
        return []
    recorded = list_mounts()
    owned_files = {m.disk_file for m in recorded}
    keep = {m.loop_device for m in recorded if m.loop_device}
    # a mount in progress is recorded before its loop device is written down
    keep |= {dev.device for dev in loop.list_devices() if dev.backing_file in owned_files}
    return loop.detach_orphans(d, keep)


ORPHAN_FUSE_MIN_AGE_S = 60.0
"""A mount records itself within a second of starting its server; older unrecorded FUSE
mounts are leftovers of a process that crashed in between."""


def _sweep_fuse_orphans() -> list[str]:
    """Unmount FUSE block devices under the state directory that no record owns.

    The server then sees its connection end and exits by itself.
    """
    prefix = str(state_dir()) + "/"
    recorded = {m.fuse_dir for m in list_mounts()}
    done = []
    for path, (fs_type, _source) in ext4.mount_points().items():
        if not path.startswith(prefix) or not fs_type.startswith("fuse") or path in recorded:
            continue
        try:
            age_s = time.time() - Path(path).parent.stat().st_mtime
        except OSError:
            continue
        if age_s >= ORPHAN_FUSE_MIN_AGE_S:
            with contextlib.suppress(MountError):
                _fuse_unmount(Path(path), lazy=True)
                done.append(path)
                log.warning("unmounted orphan FUSE block device %s", path)
    return done


def cleanup_stale() -> list[str]:
    """Tear down every recorded mount whose server died or whose owner (a build) died; detach
    orphan loop devices and unmount orphan FUSE servers.

    Returns what was cleaned (targets, devices, FUSE dirs). Safe at any time, e.g. at boot.
    """
    cleaned = []
    for info in list_mounts():
        if suspended(info):
            continue  # the node service resumes it; `tidal image umount --force` ends it
        if not server_alive(info) or not owner_alive(info):
            _teardown(info, force=True)
            cleaned.append(info.target)
    return cleaned + _sweep_orphans() + _sweep_fuse_orphans()


# --- statistics ----------------------------------------------------------------------------


def find_mount(target: str | os.PathLike[str]) -> MountInfo:
    """The record of the image mounted at ``target`` (or of a mount point's image)."""
    target_path = Path(target).resolve()
    info = _load(mount_key(target_path))
    if info is None:
        hint = " (it is mounted, but not by Tidal)" if ext4.is_mountpoint(target_path) else ""
        raise MountNotFoundError(f"no Tidal image is mounted at {target_path}{hint}")
    return info


def image_stats(target: str | os.PathLike[str]) -> dict[str, Any]:
    """The statistics the FUSE server of the mount at ``target`` last wrote (every second).

    ``fuse``: reads/writes served; ``lazy`` (``None`` for a local image): bytes fetched,
    cache hits and misses, chunks prefetched, per layer and in total.
    """
    info = find_mount(target)
    path = info.run_dir / STATS_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise MountError(
            f"the server of {info.target} has written no statistics yet ({path}); "
            "it writes them every second"
        ) from None
    except json.JSONDecodeError as exc:
        raise MountError(f"statistics file {path} is malformed: {exc}") from exc
    doc["server_alive"] = server_alive(info)
    return doc


# --- unmount -------------------------------------------------------------------------------


def unmount(
    target: str | os.PathLike[str], force: bool = False, *, serving: FuseServing | None = None
) -> None:
    """Unmount what :func:`mount_image` mounted at ``target`` and stop its server.

    Without ``force`` a busy filesystem is an error (nothing is changed); with ``force`` it is
    detached lazily. A dead FUSE server is handled either way. A mount the node service serves
    is unmounted by the service (``serving``); from another process only when it is
    suspended (the service is down) and ``force`` is given, which ends its connection.
    """
    info = find_mount(target)
    if info.fd_name is not None and serving is None:
        if server_alive(info):
            raise MountError(
                f"{info.target} is served by the node service (pid {info.server_pid}); "
                "unmount it through the service (`tidal image umount` asks it)"
            )
        if not force:
            raise MountError(
                f"{info.target} is suspended: its node service is down and the mount waits for "
                "it to come back; start `tidal node serve`, or unmount with --force"
            )
    _teardown(info, force=force, serving=serving)


def _teardown(info: MountInfo, *, force: bool, serving: FuseServing | None = None) -> None:
    target = Path(info.target)
    alive = server_alive(info)
    if ext4.is_mountpoint(target) and ext4.mount_points()[str(target)][1] == info.loop_device:
        try:
            ext4.umount(target)
        except MountError:
            if not (force or not alive):
                raise MountError(
                    f"{target} is busy (a process uses it); stop it, or unmount with --force"
                ) from None
            ext4.umount(target, lazy=True)
    if info.loop_device:
        dev = loop.get(info.loop_device)
        if dev is not None and (
            dev.backing_file == info.disk_file
            or (info.loop_backing_id is not None and dev.backing_id == info.loop_backing_id)
        ):
            loop.detach(info.loop_device)
    fuse_dir = Path(info.fuse_dir)
    if ext4.is_mountpoint(fuse_dir):
        _fuse_unmount(fuse_dir, lazy=False)
    timeout_s = load_settings().stop_timeout_s
    if info.fd_name is None:
        (serving or ProcessServing()).stop(info, timeout_s=timeout_s)
    elif serving is not None:
        serving.stop(info, timeout_s=timeout_s)
    else:  # a suspended mount: its connection is gone with the FUSE mount; forget it
        store = running_fdstore()
        if store is not None:
            store.drop(info.fd_name)
    _record_path(info.key).unlink(missing_ok=True)
    shutil.rmtree(info.run_dir, ignore_errors=True)
    log.info("unmounted %s", target)


def _fuse_unmount(fuse_dir: Path, *, lazy: bool) -> None:
    """``fusermount3 -u``; retried while the loop device lets go of the file, then lazy."""
    what = f"unmounting FUSE {fuse_dir}"
    if not lazy:
        for _ in range(20):
            try:
                run(
                    ["fusermount3", "-u", fuse_dir], what=what, error=MountError, install_hint=FUSE3
                )
                return
            except MountError:
                if not ext4.is_mountpoint(fuse_dir):
                    return
                time.sleep(0.1)
    run(
        ["fusermount3", "-u", "-z", fuse_dir],
        what=f"{what} (lazy)",
        error=MountError,
        install_hint=FUSE3,
    )


def _stop_server(pid: int, *, timeout_s: float) -> None:
    """Wait for the server to exit after its unmount; TERM, then KILL, if it does not."""
    proc = _SERVERS.pop(pid, None)
    if proc is not None:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s if sig is None else 5)
                return
            except subprocess.TimeoutExpired:
                log.warning("FUSE server %d did not exit; sending %s", pid, sig or "SIGTERM")
        return
    deadline = time.monotonic() + timeout_s
    while _server_pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _server_pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        time.sleep(0.5)
