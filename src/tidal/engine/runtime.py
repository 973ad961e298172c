"""The OCI runtime boundary: one :class:`Runtime` interface, runc, crun and runsc drivers.

Everything that runs a container goes through :class:`Runtime`: the engine (state, kill,
update, exec, delete) and each container's monitor (create, start, delete), which rebuilds the
same driver in its own process from a :class:`RuntimeRef`. Implementations declare where they
differ in :class:`RuntimeCapabilities` instead of being told apart by type; a fake over a temp
directory (:class:`tidal.testing.engine.FakeRuntime`) passes the same conformance suite
(:mod:`tidal.testing.runtime_suite`) as runc, crun and runsc.

The OCI drivers never re-implement namespaces: they drive the runtime's CLI through
:func:`tidal.proc.run`. A runtime's own failure becomes :class:`OciRuntimeError` carrying its
message (from stderr, or its log file for ``create``, whose stdio belong to the container).
Each driver keeps its state under its own ``--root`` inside the engine's state directory, so
Tidal's containers never mix with other users of the same binary.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tidal import proc
from tidal.errors import ConfigError, ContainerNotFoundError, OciRuntimeError

COMMAND_TIMEOUT_S = 60.0
"""No runtime command should take this long; a hung runtime must not hang the daemon."""
EXEC_TIMEOUT_S = 300.0
RUNTIME_STATUSES = ("creating", "created", "running", "stopped")
"""Runtime-spec container states (``state`` answers one of these)."""


@dataclass(frozen=True)
class RuntimeState:
    """``runtime state`` output (runtime spec "State"): status is created/running/stopped."""

    id: str
    status: str
    pid: int
    bundle: str


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class RuntimeCapabilities:
    """Where implementations differ in what the engine may rely on."""

    update_pids: bool
    """``update`` can change the pids limit of a running container."""
    hybrid_cgroups_need_empty_v2: bool
    """crun refuses cgroup v1+v2 hybrids whose v2 side has controllers (see hostprep)."""
    namespaces: bool = True
    """The container gets its own namespaces and cgroup (False: a host process, tests only)."""
    reports_oom: bool = True
    """The container's memory cgroup counts OOM kills the monitor can read."""
    update: bool = True
    """``update`` changes the limits of a running container (runsc 20221219 has no update)."""
    create_checks_executable: bool = True
    """``create`` fails on a missing executable (runsc finds out only at ``start``)."""
    own_proc_view: bool = False
    """The container's /proc already shows its own memory limit and CPU count (gVisor's
    kernel does), so lxcfs' views are not needed (and cannot work: lxcfs answers by the
    reader's host cgroup, and under runsc the reader is the sandbox's gofer)."""
    pod_sandbox: bool = False
    """Containers of one pod share one sandbox kernel (runsc); runc/crun pod members share
    namespaces joined by path instead."""
    trimmed_mount_view: bool = False
    """``create`` may run in a mount namespace without the other containers' mounts
    (:mod:`tidal.engine.mountview`): no process of the runtime outlives it with that view
    (runc, crun; runsc's gofer serves later pod members from the one it started in)."""


@dataclass(frozen=True)
class RuntimeRef:
    """How another process (a container's monitor) builds the same driver: JSON-safe."""

    factory: str
    """``module:Class`` of the :class:`Runtime` implementation."""
    root: str
    binary: str | None = None
    options: tuple[str, ...] = ()
    """Extra global flags of the runtime's CLI (runsc's ``[engine] runsc_flags``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "root": self.root,
            "binary": self.binary,
            "options": list(self.options),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuntimeRef:
        options = tuple(str(o) for o in data.get("options") or ())
        return cls(str(data["factory"]), str(data["root"]), data.get("binary"), options)


def open_runtime(ref: RuntimeRef) -> Runtime:
    """The driver ``ref`` names (imports its module; the monitor's way back to it)."""
    module, _, name = ref.factory.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"runtime driver {ref.factory!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise ConfigError(f"runtime driver {ref.factory!r} is not a Runtime")
    return cls(Path(ref.root), ref.binary, ref.options)


class Runtime(ABC):
    """A container runtime with OCI runtime-spec verbs. State lives under :attr:`root`."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[RuntimeCapabilities]

    def __init__(
        self, root: Path, binary: str | None = None, options: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    def ref(self) -> RuntimeRef:
        cls = type(self)
        return RuntimeRef(f"{cls.__module__}:{cls.__qualname__}", str(self.root), None)

    @abstractmethod
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
        """Create the container from ``bundle``; its init waits for :meth:`start`.

        Its stdio are ``stdout``/``stderr`` (fds, e.g. a log file) and ``stdin`` (an fd, or
        /dev/null); its pid is written to ``pid_file``. The init is re-parented to the nearest
        subreaper (the monitor), as runc's. With ``process.terminal`` in the bundle the
        runtime sends the pty master to the unix socket ``console_socket`` instead (OCI
        runtime CLI's ``--console-socket``).
        """

    @abstractmethod
    def start(self, cid: str) -> None:
        """Run the user process of a created container."""

    def run_detached(
        self,
        cid: str,
        bundle: Path,
        *,
        pid_file: Path,
        log_path: Path,
        stdout: int,
        stderr: int,
        stdin: int | None = None,
    ) -> None:
        """:meth:`create` then :meth:`start`, for a container nothing must be set up for in
        between (no terminal to receive, no port to open). A runtime that can do both in one
        command overrides this: each runtime command is a process start-up on the path of
        every container start. On a failed start the container is left for the caller to
        delete, as after a failed :meth:`start`."""
        self.create(
            cid,
            bundle,
            pid_file=pid_file,
            log_path=log_path,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
        )
        self.start(cid)

    @abstractmethod
    def state(self, cid: str) -> RuntimeState | None:
        """The runtime's view, or None if it does not know the container."""

    @abstractmethod
    def kill(self, cid: str, signal: str = "TERM", *, all_processes: bool = False) -> None:
        """Send ``signal`` (name without SIG) to the init, or every process with ``all``."""

    @abstractmethod
    def delete(self, cid: str, *, force: bool = False) -> None:
        """Forget the container (runs poststop hooks); unknown ids are not an error.

        Without ``force`` a running container is refused (:class:`OciRuntimeError`).
        """

    @abstractmethod
    def update(self, cid: str, resources: dict[str, Any]) -> None:
        """Change cgroup limits of a running container (runtime-spec ``linux.resources``)."""

    @abstractmethod
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
        """Run a command inside the running container and collect its output."""

    @abstractmethod
    def list_ids(self) -> list[str]:
        """Ids of every container this runtime root knows (for reconciliation)."""

    def wait_exit(self, cid: str, pid: int) -> int | None:
        """Block until container ``cid`` exits and return its exit status, for a container
        whose ``pid`` the caller cannot wait for as its parent; None: wait for ``pid``
        (runc, crun: the init is the caller's child by way of its subreaper)."""
        return None

    def pod_annotations(self, sandbox_id: str, *, is_sandbox: bool) -> dict[str, str]:
        """OCI annotations that put a container into the pod whose sandbox (infra) container
        is ``sandbox_id``. runc and crun need none: pod members join the sandbox's
        namespaces by path (``linux.namespaces``), which the bundle already says."""
        return {}


class OciCliRuntime(Runtime):
    """An OCI runtime CLI (runc, crun, runsc). Subclasses fix the binary name and capabilities."""

    detached_run: ClassVar[bool] = True
    """:meth:`run_detached` is one ``run --detach`` (runc, crun)."""

    def __init__(
        self, root: Path, binary: str | None = None, options: tuple[str, ...] = ()
    ) -> None:
        found = binary or shutil.which(self.name)
        if not found or not (os.path.isfile(found) and os.access(found, os.X_OK)):
            what = f": {binary!r} is not an executable" if binary else " is not installed"
            raise ConfigError(
                f"OCI runtime {self.name!r}{what}; apt-get install {self.name}"
                + (f" or fix [engine] {self.name}_binary" if binary else "")
            )
        self.binary = found
        self.options = tuple(options)
        super().__init__(root)

    def ref(self) -> RuntimeRef:
        return RuntimeRef(super().ref().factory, str(self.root), self.binary, self.options)

    # --- argv builders (pure; also used by the benchmark's bare baseline) ------------------

    def global_args(self, log_path: Path | None = None) -> list[str]:
        args = [self.binary, "--root", str(self.root), *self.options]
        if log_path is not None:
            args += ["--log", str(log_path), "--log-format", "json"]
        return args

    def container_args(self, cid: str, bundle: Path | None = None) -> list[str]:
        """Global flags that depend on the container (runsc's ``--network``); none here."""
        return []

    def create_argv(
        self,
        cid: str,
        bundle: Path,
        pid_file: Path,
        log_path: Path,
        console_socket: Path | None = None,
    ) -> list[str]:
        console = ["--console-socket", str(console_socket)] if console_socket else []
        return [
            *self.global_args(log_path),
            *self.container_args(cid, bundle),
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            *console,
            cid,
        ]

    def run_detached_argv(
        self, cid: str, bundle: Path, pid_file: Path, log_path: Path
    ) -> list[str]:
        """``run --detach``: create and start in one runtime process, which returns once the
        user process runs (re-parented to the caller's subreaper, as after ``create``)."""
        return [
            *self.global_args(log_path),
            *self.container_args(cid, bundle),
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            cid,
        ]

    def run_argv(self, cid: str, bundle: Path) -> list[str]:
        """Foreground ``run`` of a bundle: the bare-runtime baseline of the benchmark."""
        return [
            *self.global_args(),
            *self.container_args(cid, bundle),
            "run",
            "--bundle",
            str(bundle),
            cid,
        ]

    # --- commands ----------------------------------------------------------------------------

    def _run(
        self, cid: str, verb: str, *args: str, input_bytes: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        done = proc.run(
            [*self.global_args(), *self.container_args(cid), verb, *args],
            what=f"{self.name} {verb} {cid}",
            error=OciRuntimeError,
            timeout_s=COMMAND_TIMEOUT_S,
            input=input_bytes,
            stdin=subprocess.DEVNULL if input_bytes is None else None,
            text=False,
            check=False,
        )
        if done.returncode != 0:
            msg = _clean(done.stderr) or _clean(done.stdout) or f"exit status {done.returncode}"
            low = msg.lower()
            # runc and crun keep <root>/<id> for every container they know; the message alone
            # is ambiguous (crun reports a missing exec.fifo of a started one the same way).
            known = self.knows(cid)
            hint = ("does not exist", "not found", "no such file or directory")
            if not known and any(t in low for t in hint):
                raise ContainerNotFoundError(f"{self.name}: container {cid} does not exist: {msg}")
            raise OciRuntimeError(f"{self.name} {verb} {cid} failed: {msg}")
        return done

    def knows(self, cid: str) -> bool:
        """Whether the runtime root holds state for ``cid`` (runc and crun: ``<root>/<id>/``)."""
        return (self.root / cid).is_dir()

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
        self._run_with_stdio(
            "create",
            self.create_argv(cid, bundle, pid_file, log_path, console_socket),
            cid,
            log_path,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
        )

    def _run_with_stdio(
        self,
        verb: str,
        argv: list[str],
        cid: str,
        log_path: Path,
        *,
        stdout: int,
        stderr: int,
        stdin: int | None,
    ) -> None:
        """A verb whose stdio becomes the container's (``create``, ``run --detach``); its
        error is what the runtime logged."""
        done = proc.run(
            argv,
            what=f"{self.name} {verb} {cid}",
            error=OciRuntimeError,
            timeout_s=COMMAND_TIMEOUT_S,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
        if done.returncode != 0:
            why = read_runtime_log(log_path) or f"exit status {done.returncode}"
            prefix = f"{self.name} {verb} failed: "
            raise OciRuntimeError(prefix + why.removeprefix(prefix))

    def run_detached(
        self,
        cid: str,
        bundle: Path,
        *,
        pid_file: Path,
        log_path: Path,
        stdout: int,
        stderr: int,
        stdin: int | None = None,
    ) -> None:
        """One ``run --detach`` instead of ``create`` and ``start``: one Go start-up (about
        8 ms of a pool hit's 86) fewer. Without :attr:`detached_run`, create then start."""
        if not self.detached_run:
            super().run_detached(
                cid,
                bundle,
                pid_file=pid_file,
                log_path=log_path,
                stdout=stdout,
                stderr=stderr,
                stdin=stdin,
            )
            return
        self._run_with_stdio(
            "run",
            self.run_detached_argv(cid, bundle, pid_file, log_path),
            cid,
            log_path,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
        )

    def start(self, cid: str) -> None:
        self._run(cid, "start", cid)

    def state(self, cid: str) -> RuntimeState | None:
        try:
            done = self._run(cid, "state", cid)
        except ContainerNotFoundError:
            return None
        data = json.loads(done.stdout)
        return RuntimeState(
            id=data["id"],
            status=data["status"],
            pid=int(data.get("pid") or 0),
            bundle=data["bundle"],
        )

    def kill(self, cid: str, signal: str = "TERM", *, all_processes: bool = False) -> None:
        args = ["--all"] if all_processes else []
        self._run(cid, "kill", *args, cid, signal)

    def delete(self, cid: str, *, force: bool = False) -> None:
        try:
            self._run(cid, "delete", *(["--force"] if force else []), cid)
        except ContainerNotFoundError:
            return

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        self._run(
            cid, "update", "--resources", "-", cid, input_bytes=json.dumps(resources).encode()
        )

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
        args = [*self.global_args(), *self.container_args(cid), "exec"]
        for e in self._exec_env(cid, env or []):
            args += ["--env", e]
        if cwd:
            args += ["--cwd", cwd]
        args += [cid, *argv]
        done = proc.run(
            args,
            what=f"exec {argv[0]!r} in {cid}",
            error=OciRuntimeError,
            timeout_s=timeout_s,
            input=stdin or b"",
            text=False,
            check=False,
        )
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def _exec_env(self, cid: str, env: list[str]) -> list[str]:
        """``env`` over the container's own process env: crun's ``exec --env`` replaces the
        environment (PATH included) where runc's adds to it, so both are given the whole."""
        if not env:
            return []
        st = self.state(cid)
        base: list[str] = []
        if st is not None:
            try:
                cfg = json.loads((Path(st.bundle) / "config.json").read_text())
                base = [str(e) for e in cfg.get("process", {}).get("env") or ()]
            except (OSError, ValueError):
                base = []
        merged = {e.partition("=")[0]: e for e in base}
        merged.update({e.partition("=")[0]: e for e in env})
        return list(merged.values())

    def list_ids(self) -> list[str]:
        done = self._run("*", "list", "--format", "json")
        data = json.loads(done.stdout or b"null") or []
        return [str(c["id"]) for c in data]


class RuncRuntime(OciCliRuntime):
    name = "runc"
    capabilities = RuntimeCapabilities(
        update_pids=True, hybrid_cgroups_need_empty_v2=False, trimmed_mount_view=True
    )


class CrunRuntime(OciCliRuntime):
    name = "crun"
    capabilities = RuntimeCapabilities(
        update_pids=True, hybrid_cgroups_need_empty_v2=True, trimmed_mount_view=True
    )


RUNSC_DEFAULT_OPTIONS = ("--platform=ptrace", "--overlay2=none", "--cpu-num-from-quota")
"""runsc's global flags unless ``[engine] runsc_flags`` adds to them (see :class:`RunscRuntime`)."""
POD_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
POD_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
"""The CRI annotations runsc reads to put a container into an existing sandbox."""


class RunscRuntime(OciCliRuntime):
    """gVisor's ``runsc``: the container's system calls meet gVisor's kernel, not the host's.

    Flags, chosen by running Debian's runsc 0.0~20221219 on this kind of node (2 cores, a
    virtual machine with cgroup v1 hierarchies and a cgroup2 mount beside them):

    - ``--platform=ptrace``: the one platform that boots here. /dev/kvm exists, but the kvm
      platform's sandbox spins at boot in this nested guest; systrap is newer than this
      release. On bare metal add ``--platform=kvm`` to ``[engine] runsc_flags`` (a later flag
      wins).
    - ``--network`` per container, from its bundle: a new empty netns (``--network none``)
      -> ``none`` (gVisor's netstack with loopback only); the engine's bridge netns (given by
      path) -> ``host``: the sandbox joins that netns and its sockets are the host kernel's
      inside it (the container still sees only its own veth and address). gVisor's own
      netstack (``sandbox``) would keep TCP/IP out of the host kernel too, but this release
      refuses every netns on kernels from about 6.10 on ("cannot run with network enabled in
      root network namespace": its root-netns test looks for /proc/sys/net/core/rmem_default,
      which such kernels show in every netns; google/gvisor#10704, fixed in later releases).
      ``--network host`` of the engine -> ``host`` in the host's netns. runsc sets the network
      up at ``start``, so every verb gets the flag the container was created with (read back
      from runsc's state file).
    - ``--overlay2=none``: the engine's rootfs is already an overlay whose upper layer lives
      on the container's quota volume; gVisor's in-memory overlay would keep writes in the
      sandbox's memory (charged to ``--memory``, lost at restart, outside ``--disk-quota``).
    - ``--cpu-num-from-quota``: ``nproc`` and /proc/cpuinfo follow ``--cpus`` (rounded up;
      gVisor shows at least 2). /proc/meminfo follows ``--memory`` on its own.
    - cgroups: this runsc takes cgroup v2 only when /sys/fs/cgroup itself is cgroup2; on a
      hybrid host it creates ``linux.cgroupsPath`` in every v1 hierarchy from mountinfo and
      puts the sandbox and its gofer there, so ``--memory``/``--cpus``/``--pids-limit`` are
      the host kernel's limits on the whole sandbox, and the v2 mount is left alone (no
      crun-style host preparation). Neither ``--systemd-cgroup`` (the engine uses cgroupfs
      paths) nor ``--ignore-cgroups`` (the limits would not hold).

    Where it differs from runc, found by running it: no ``update`` verb; ``create`` builds the
    sandbox and finds a missing executable only at ``start``; a second ``create`` of a known
    id fails *and deletes the first one's state* (orphaning its sandbox), so the driver refuses
    it first; the sandbox and gofer become children of the caller's subreaper (the monitor),
    and ``delete`` waits for them to die, so the driver reaps them while it deletes.
    """

    name = "runsc"
    detached_run = False
    """``create`` then ``start``: this driver's create refuses a known id before runsc can
    delete its state, and a pod member gets its stdio at start (below)."""
    capabilities = RuntimeCapabilities(
        update_pids=False,
        hybrid_cgroups_need_empty_v2=False,
        update=False,
        create_checks_executable=False,
        own_proc_view=True,
        pod_sandbox=True,
    )

    def __init__(
        self, root: Path, binary: str | None = None, options: tuple[str, ...] = ()
    ) -> None:
        super().__init__(root, binary, options or RUNSC_DEFAULT_OPTIONS)
        self._member_stdio: dict[str, tuple[int, int, Path]] = {}

    def _state_file(self, cid: str) -> Path | None:
        """runsc keeps ``<root>/<container id>_sandbox:<sandbox id>.state`` per container
        (gVisor's ``state_file.go``; the two ids are the same for a sandbox, so a pattern
        with them the other way round found sandboxes only, and a pod member's monitor then
        reaped no gofer: its ``runsc delete`` waited out runsc's 5 s for the zombie)."""
        if not cid or "/" in cid or "*" in cid or "?" in cid or "[" in cid:
            return None
        for path in self.root.glob(f"{cid}_sandbox:*.state"):
            return path
        return None

    def _saved_state(self, cid: str) -> dict[str, Any]:
        path = self._state_file(cid)
        if path is None:
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def knows(self, cid: str) -> bool:
        return self._state_file(cid) is not None

    def container_args(self, cid: str, bundle: Path | None = None) -> list[str]:
        if bundle is not None:
            try:
                config = json.loads((bundle / "config.json").read_text())
            except (OSError, ValueError):
                return []
        else:
            config = self._saved_state(cid).get("spec")
            if not config:
                return []  # unknown to runsc: it answers "does not exist" itself
        return [f"--network={runsc_network(config)}"]

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
        if self.knows(cid):
            raise OciRuntimeError(f"runsc create failed: container {cid} already exists")
        super().create(
            cid,
            bundle,
            pid_file=pid_file,
            log_path=log_path,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            console_socket=console_socket,
        )
        if _is_pod_member(bundle):
            # A pod member's process gets the stdio of ``runsc start``, not of ``create``
            # (the sandbox already runs): keep the caller's fds for our own start.
            self._member_stdio[cid] = (os.dup(stdout), os.dup(stderr), log_path)

    def start(self, cid: str) -> None:
        held = self._member_stdio.pop(cid, None)
        if held is None:
            super().start(cid)
            return
        out, err, log_path = held
        try:
            done = proc.run(
                [*self.global_args(log_path), *self.container_args(cid), "start", cid],
                what=f"runsc start {cid}",
                error=OciRuntimeError,
                timeout_s=COMMAND_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                check=False,
            )
        finally:
            os.close(out)
            os.close(err)
        if done.returncode != 0:
            why = read_runtime_log(log_path) or f"exit status {done.returncode}"
            raise OciRuntimeError(f"runsc start {cid} failed: {why}")

    def wait_exit(self, cid: str, pid: int) -> int | None:
        """A pod member's recorded pid is its pod's sandbox, which its own monitor did not
        start: ``runsc wait`` answers for the member alone."""
        if _parent_of(pid) == os.getpid():
            return None
        while True:
            try:
                done = self._run(cid, "wait", cid)
            except ContainerNotFoundError:
                return None
            except OciRuntimeError:
                st = self.state(cid)
                if st is not None and st.status == "running":
                    continue  # only the command's own timeout ran out
                raise
            try:
                return int(json.loads(done.stdout)["exitStatus"])
            except (ValueError, KeyError, TypeError):
                return None

    def delete(self, cid: str, *, force: bool = False) -> None:
        held = self._member_stdio.pop(cid, None)  # created, never started
        if held is not None:
            os.close(held[0])
            os.close(held[1])
        self._reap_helpers(cid)
        super().delete(cid, force=force)

    def _reap_helpers(self, cid: str) -> None:
        """Reap the sandbox and gofer if they are our children (we are the monitor, their
        subreaper): ``runsc delete`` waits for them to be gone, and a zombie never is.

        Only the pids runsc recorded are waited for, so no other child's status is taken."""
        data = self._saved_state(cid)
        sandbox = data.get("sandbox") or {}
        me = os.getpid()
        for pid in (data.get("goferPid"), sandbox.get("pid")):
            if isinstance(pid, int) and pid > 0 and _parent_of(pid) == me:
                threading.Thread(target=_reap, args=(pid,), daemon=True).start()

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        if not self.knows(cid):
            raise ContainerNotFoundError(f"runsc: container {cid} does not exist")
        raise OciRuntimeError(
            f"runsc cannot change the limits of running container {cid} (gVisor has no "
            "update); stop it, update, and start it again"
        )

    def pod_annotations(self, sandbox_id: str, *, is_sandbox: bool) -> dict[str, str]:
        """The CRI annotations runsc reads: the sandbox container starts a gVisor kernel, every
        other member is created inside it (same kernel, network stack, IPC)."""
        return {
            POD_CONTAINER_TYPE: "sandbox" if is_sandbox else "container",
            POD_SANDBOX_ID: sandbox_id,
        }


def _is_pod_member(bundle: Path) -> bool:
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("annotations") or {}).get(POD_CONTAINER_TYPE) == "container"


def runsc_network(config: dict[str, Any]) -> str:
    """runsc's ``--network`` for a bundle's config (see :class:`RunscRuntime`): ``none`` for
    a new netns, ``host`` (the host kernel's sockets) in a netns given by path or the host's."""
    for ns in (config.get("linux") or {}).get("namespaces") or ():
        if isinstance(ns, dict) and ns.get("type") == "network" and not ns.get("path"):
            return "none"
    return "host"


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


RUNTIME_CLASSES: dict[str, type[Runtime]] = {
    "runc": RuncRuntime,
    "crun": CrunRuntime,
    "runsc": RunscRuntime,
}


def get_runtime(
    name: str,
    state_dir: Path,
    *,
    binary: str | None = None,
    options: tuple[str, ...] = (),
) -> Runtime:
    """The driver for ``name`` with its state under ``state_dir/runtime/<name>``.

    ``binary`` overrides the one found on PATH; ``options`` are extra global flags (runsc's are
    added after its defaults, and a later flag wins)."""
    try:
        cls = RUNTIME_CLASSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_CLASSES)}"
        ) from None
    if cls is RunscRuntime and options:
        options = (*RUNSC_DEFAULT_OPTIONS, *options)
    return cls(state_dir / "runtime" / name, binary, options)


def runtime_messages(text: str, *, errors_only: bool = False) -> str:
    """One readable line out of runtime output: runc/crun log JSON lines (``{"level", "msg"}``)
    or plain text. ``errors_only`` drops JSON records below warning (a ``--log`` file also
    holds debug noise). The one parser for stderr, ``--log`` files and the monitor's reports."""
    msgs = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if line.strip():
                msgs.append(line.strip())
            continue
        if not isinstance(rec, dict) or not rec.get("msg"):
            continue
        if errors_only and rec.get("level") not in ("error", "fatal", "warning", None):
            continue
        msgs.append(str(rec["msg"]))
    return "; ".join(msgs)[-2000:]


def _clean(raw: bytes) -> str:
    """One readable line out of runtime stderr (runc logs JSON lines, crun plain text)."""
    return runtime_messages(raw.decode(errors="replace").strip())


def read_runtime_log(path: Path) -> str:
    """Error lines from a runtime's ``--log`` file (JSON lines with level and msg)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return ""
    return runtime_messages(raw.decode(errors="replace"), errors_only=True)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


__all__ = [
    "RUNTIME_CLASSES",
    "CrunRuntime",
    "ExecResult",
    "OciCliRuntime",
    "RuncRuntime",
    "RunscRuntime",
    "Runtime",
    "RuntimeCapabilities",
    "RuntimeRef",
    "RuntimeState",
    "get_runtime",
    "open_runtime",
    "runtime_messages",
]
