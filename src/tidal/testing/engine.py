"""Engine fakes: a runtime, a mounter, a network and pod namespaces over a temp directory, no
root needed.

They are real implementations of the engine's four host adapters, with their state in files
so that a container's monitor (another process) and a restarted engine see the same world:

* :class:`FakeRuntime` runs a bundle's ``process.args`` as a plain host process (no
  namespaces, no cgroup; its capabilities say so). Like runc, ``create`` leaves an init that
  waits on a FIFO until ``start`` and is re-parented to the nearest subreaper (the monitor),
  so the monitor reaps it and learns its exit status. It passes the same conformance suite as
  runc and crun (:mod:`tidal.testing.runtime_suite`).
* :class:`FakeMounter` executes mount plans by recording them (``mounts.json``).
* :class:`FakeNetwork` keeps network namespaces as files and addresses in ``netns.json``.
* :class:`FakePodNamespaces` keeps a pod's IPC and UTS namespaces as plain files (the UTS
  one holding the hostname) and counts what it made and removed.

:func:`fake_engine` builds an :class:`~tidal.engine.containers.Engine` on all four.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal as signals
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tidal.engine.mounter import Mounter
from tidal.engine.network import Network, netns_name
from tidal.engine.podns import PodNamespacePaths, PodNamespaces
from tidal.engine.runtime import (
    EXEC_TIMEOUT_S,
    ExecResult,
    Runtime,
    RuntimeCapabilities,
    RuntimeState,
    pid_alive,
)
from tidal.engine.state import EXT4_LOOP, TIDAL_IMAGE, Mount
from tidal.errors import ContainerNotFoundError, EngineError, OciRuntimeError, QuotaError
from tidal.fsutil import write_json_atomic

_INIT = """fifo=$1; pidf=$2; shift 2
exec 3<&0
( read _ < "$fifo"; exec "$@" <&3 3<&- ) &
echo $! > "$pidf"
"""
"""The fake's init: a subshell that blocks on the FIFO, then becomes the user process. The outer
shell exits at once, so the init is re-parented as runc's is. Its stdin goes through fd 3: a
background job of a non-interactive shell gets /dev/null as its stdin."""
START_WAIT_S = 5.0


def _signal_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    n = name.upper()
    try:
        return int(getattr(signals, n if n.startswith("SIG") else "SIG" + n))
    except AttributeError:
        raise OciRuntimeError(f"unknown signal {name!r}") from None


class FakeRuntime(Runtime):
    """Host processes under a runtime-spec state machine; state in ``root/<id>/state.json``."""

    name = "fake"
    capabilities = RuntimeCapabilities(
        update_pids=True, hybrid_cgroups_need_empty_v2=False, namespaces=False, reports_oom=False
    )

    def _dir(self, cid: str) -> Path:
        return self.root / cid

    def _load(self, cid: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self._dir(cid) / "state.json").read_text())
        except (OSError, ValueError):
            raise ContainerNotFoundError(f"fake: container {cid} does not exist") from None
        return data

    def _status(self, cid: str, data: dict[str, Any]) -> str:
        if not pid_alive(int(data["pid"])):
            return "stopped"
        return "created" if (self._dir(cid) / "exec.fifo").exists() else "running"

    def create(
        self,
        cid: str,
        bundle: Path,
        *,
        pid_file: Path,
        log_path: Path,
        stdout: int,
        stderr: int,
        stdin: int | None = None,
        console_socket: Path | None = None,
    ) -> None:
        if console_socket is not None:
            raise OciRuntimeError("fake create failed: the fake runtime has no terminals (-t)")
        d = self._dir(cid)
        try:
            d.mkdir()
        except FileExistsError:
            raise OciRuntimeError(f"fake create failed: container {cid} already exists") from None
        try:
            config = json.loads((bundle / "config.json").read_text())
            process = config["process"]
            args = [str(a) for a in process["args"]]
            env = dict(str(e).partition("=")[::2] for e in process.get("env") or ())
            env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
            if shutil.which(args[0], path=env["PATH"]) is None:
                raise OciRuntimeError(
                    f'fake create failed: exec: "{args[0]}": executable file not found in $PATH'
                )
            root = Path(config["root"]["path"])
            root = root if root.is_absolute() else bundle / root
            cwd = root / str(process.get("cwd") or "/").lstrip("/")
            os.mkfifo(d / "exec.fifo")
            child_pid = d / "init.pid"
            outer = subprocess.Popen(
                ["/bin/sh", "-c", _INIT, "fake-init", str(d / "exec.fifo"), str(child_pid), *args],
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=cwd if cwd.is_dir() else (root if root.is_dir() else "/"),
                start_new_session=True,
            )
            outer.wait(timeout=30)
            pid = int(child_pid.read_text().strip())
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        state = {"id": cid, "pid": pid, "pgid": outer.pid, "bundle": str(bundle), "resources": {}}
        write_json_atomic(d / "state.json", state)
        pid_file.write_text(f"{pid}\n")

    def start(self, cid: str) -> None:
        data = self._load(cid)
        status = self._status(cid, data)
        if status != "created":
            raise OciRuntimeError(
                f"fake start {cid} failed: cannot start a container that is {status}"
            )
        fifo = self._dir(cid) / "exec.fifo"
        deadline = time.monotonic() + START_WAIT_S
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:  # ENXIO: the init has not opened its end yet
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise OciRuntimeError(f"fake start {cid} failed: {exc}") from exc
                if not pid_alive(int(data["pid"])):
                    raise OciRuntimeError(f"fake start {cid} failed: its init died") from None
                time.sleep(0.001)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)
        fifo.unlink()

    def state(self, cid: str) -> RuntimeState | None:
        try:
            data = self._load(cid)
        except ContainerNotFoundError:
            return None
        status = self._status(cid, data)
        return RuntimeState(
            cid, status, int(data["pid"]) if status != "stopped" else 0, data["bundle"]
        )

    def kill(self, cid: str, signal: str = "TERM", *, all_processes: bool = False) -> None:
        data = self._load(cid)
        if self._status(cid, data) == "stopped":
            raise OciRuntimeError(f"fake kill {cid} failed: container not running")
        num = _signal_number(signal)
        try:
            if all_processes:
                os.killpg(int(data["pgid"]), num)
            else:
                os.kill(int(data["pid"]), num)
        except ProcessLookupError:
            pass

    def delete(self, cid: str, *, force: bool = False) -> None:
        try:
            data = self._load(cid)
        except ContainerNotFoundError:
            return
        status = self._status(cid, data)
        if status != "stopped":
            if not force:
                raise OciRuntimeError(
                    f"fake delete {cid} failed: cannot delete container that is not stopped: {status}"
                )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(data["pgid"]), signals.SIGKILL)
            deadline = time.monotonic() + START_WAIT_S
            while pid_alive(int(data["pid"])) and time.monotonic() < deadline:
                time.sleep(0.005)
        shutil.rmtree(self._dir(cid), ignore_errors=True)

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        data = self._load(cid)
        if self._status(cid, data) != "running":
            raise OciRuntimeError(f"fake update {cid} failed: container not running")
        data["resources"] = {**data.get("resources", {}), **resources}
        write_json_atomic(self._dir(cid) / "state.json", data)

    def resources(self, cid: str) -> dict[str, Any]:
        """What :meth:`update` recorded (tests' view of the limits)."""
        res: dict[str, Any] = self._load(cid).get("resources", {})
        return res

    def exec(
        self,
        cid: str,
        argv: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float = EXEC_TIMEOUT_S,
    ) -> ExecResult:
        data = self._load(cid)
        if self._status(cid, data) != "running":
            raise OciRuntimeError(f"fake exec in {cid} failed: container not running")
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        full_env.update(dict(str(e).partition("=")[::2] for e in env or ()))
        try:
            done = subprocess.run(
                argv,
                input=stdin or b"",
                capture_output=True,
                env=full_env,
                cwd=cwd,
                timeout=timeout_s,
                check=False,
            )
        except FileNotFoundError:
            return ExecResult(127, b"", f"exec: {argv[0]!r}: not found\n".encode())
        except subprocess.TimeoutExpired as exc:
            raise OciRuntimeError(
                f"exec {argv[0]!r} in {cid} ran longer than {timeout_s}s"
            ) from exc
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def list_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "state.json").exists())


def fake_runtime_factory(name: str, state_dir: Path) -> Runtime:
    """An engine ``runtime_factory``: a :class:`FakeRuntime` for every runtime name."""
    return FakeRuntime(state_dir / "runtime" / f"fake-{name}")


class _JsonState:
    """A small JSON document on disk guarded by a lock (one writer process at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path, data)


class FakeMounter(Mounter):
    """Mount plans recorded in ``root/mounts.json`` instead of made.

    ``fail_unmount`` holds targets whose unmount fails (to test that cleanup failures are
    reported); ``made`` counts mounts by type."""

    def __init__(self, root: Path) -> None:
        self.state = _JsonState(root / "mounts.json")
        self.fail_unmount: set[str] = set()
        self.made: dict[str, int] = {}

    def _mount(self, m: Mount) -> None:
        if m.type == EXT4_LOOP and not Path(m.source).is_file():
            raise QuotaError(f"fake mount: volume file {m.source} does not exist")
        if m.type == TIDAL_IMAGE and not (Path(m.source) / "manifest.json").is_file():
            raise EngineError(f"fake mount: {m.source} is not a Tidal image")
        with self.state.lock:
            data = self.state.load()
            data[m.target] = {"type": m.type, "source": m.source, "options": list(m.options)}
            self.state.save(data)
        self.made[m.type] = self.made.get(m.type, 0) + 1

    def unmount(self, m: Mount) -> None:
        if m.target in self.fail_unmount:
            raise EngineError(f"fake unmount of {m.target} failed: target is busy")
        with self.state.lock:
            data = self.state.load()
            if data.pop(m.target, None) is not None:
                self.state.save(data)

    def mounted(self, target: str) -> bool:
        return target in self.state.load()

    def mounts_under(self, directory: Path) -> list[str]:
        prefix = str(directory).rstrip("/") + "/"
        found = [t for t in self.state.load() if t == str(directory) or t.startswith(prefix)]
        return sorted(found, key=len, reverse=True)

    def mkfs_ext4(self, image_path: Path, argv: list[str]) -> None:
        if not image_path.is_file() or str(image_path) not in argv:
            raise QuotaError(f"fake mkfs: {image_path} is not a sized file named in {argv}")
        self.made["mkfs"] = self.made.get("mkfs", 0) + 1

    def table(self) -> dict[str, dict[str, Any]]:
        return self.state.load()


class FakeNetwork(Network):
    """Namespaces as files under ``root/netns``, their addresses in ``root/netns.json``;
    ``taken_ports`` are host ports "another process" holds."""

    def __init__(self, root: Path, bridge: str = "tidal0", subnet: str = "10.88.0.0/24") -> None:
        super().__init__(bridge, subnet)
        self.root = root
        self.state = _JsonState(root / "netns.json")
        (root / "netns").mkdir(parents=True, exist_ok=True)
        self.taken_ports: set[int] = set()
        self.bridge_up = False
        self.flushed: list[str] = []

    def ensure_bridge(self) -> None:
        self.bridge_up = True

    def create_netns(self, cid: str, ip: str) -> str:
        with self.state.lock:
            data = self.state.load()
            data[cid] = ip
            self.state.save(data)
        path = self.netns_path(cid)
        Path(path).touch()
        return path

    def destroy_netns(self, cid: str) -> None:
        with self.state.lock:
            data = self.state.load()
            data.pop(cid, None)
            self.state.save(data)
        Path(self.netns_path(cid)).unlink(missing_ok=True)

    def netns_path(self, cid: str) -> str:
        return str(self.root / "netns" / netns_name(cid))

    def netns_exists(self, cid: str) -> bool:
        return Path(self.netns_path(cid)).exists()

    def flush_neighbours(self, cid: str) -> None:
        if not self.netns_exists(cid):
            raise EngineError(f"no network namespace for container {cid[:12]}")
        self.flushed.append(cid)

    def host_port_free(self, host_ip: str, port: int) -> bool:
        return port not in self.taken_ports

    def namespaces(self) -> dict[str, str]:
        return self.state.load()


class FakePodNamespaces(PodNamespaces):
    """Namespace files that are plain files: ``uts`` holds the hostname it was made with."""

    def __init__(self) -> None:
        self.created = 0
        self.destroyed = 0

    def create(
        self, directory: Path, hostname: str, *, netns: str | None = None
    ) -> PodNamespacePaths:
        paths = PodNamespacePaths.under(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths.ipc.write_text("ipc\n")
        paths.uts.write_text(hostname + "\n")
        self.created += 1
        return paths

    def exists(self, directory: Path) -> bool:
        return all(f.is_file() for f in PodNamespacePaths.under(directory).files())

    def destroy(self, directory: Path) -> None:
        if directory.is_dir():
            self.destroyed += 1
            shutil.rmtree(directory)

    def set_hostname(self, directory: Path, hostname: str) -> None:
        PodNamespacePaths.under(directory).uts.write_text(hostname + "\n")

    def renew_ipc(self, directory: Path) -> None:
        ipc = PodNamespacePaths.under(directory).ipc
        generation = int(ipc.read_text().strip().removeprefix("ipc") or "0") + 1
        ipc.write_text(f"ipc{generation}\n")


def fake_engine(
    root: Path,
    *,
    mounter: FakeMounter | None = None,
    network: FakeNetwork | None = None,
    pod_namespaces: FakePodNamespaces | None = None,
    **settings: Any,
) -> Any:
    """An :class:`~tidal.engine.containers.Engine` under ``root`` on the three fakes.

    Passing the same ``root`` (and fakes) again is a restarted engine on the same node."""
    from tidal.engine.containers import Engine
    from tidal.engine.settings import EngineSettings

    base: dict[str, Any] = {
        "state_dir": root / "engine",
        "default_disk_quota_bytes": 0,
        "lxcfs": "off",
        "stop_timeout_s": 2.0,
        "upgrade_probe_s": 0.3,
        "volume_pool_size": 0,
    }
    base.update(settings)
    return Engine(
        EngineSettings(**base),
        runtime_factory=fake_runtime_factory,
        mounter=mounter or FakeMounter(root / "host"),
        network=network or FakeNetwork(root / "host"),
        pod_namespaces=pod_namespaces or FakePodNamespaces(),
    )


def fake_rootfs(path: Path, files: Iterable[tuple[str, str]] = ()) -> Path:
    """A directory image (the directory rootfs provider's input) with ``files`` in it."""
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in files:
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return path
