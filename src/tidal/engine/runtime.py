"""The OCI runtime boundary: one :class:`Runtime` interface, runc and crun drivers.

Everything that runs a container goes through :class:`Runtime`: the engine (state, kill,
update, exec, delete) and each container's monitor (create, start, delete), which rebuilds the
same driver in its own process from a :class:`RuntimeRef`. Implementations declare where they
differ in :class:`RuntimeCapabilities` instead of being told apart by type; a fake over a temp
directory (:class:`tidal.testing.engine.FakeRuntime`) passes the same conformance suite
(:mod:`tidal.testing.runtime_suite`) as runc and crun.

The OCI drivers never re-implement namespaces: they drive the runtime's CLI through
:func:`tidal.proc.run`. A runtime's own failure becomes :class:`OciRuntimeError` carrying its
message (from stderr, or its log file for ``create``, whose stdio belong to the container).
Each driver keeps its state under its own ``--root`` inside the engine's state directory, so
Tidal's containers never mix with other users of the same binary.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
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


@dataclass(frozen=True)
class RuntimeRef:
    """How another process (a container's monitor) builds the same driver: JSON-safe."""

    factory: str
    """``module:Class`` of the :class:`Runtime` implementation."""
    root: str
    binary: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"factory": self.factory, "root": self.root, "binary": self.binary}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuntimeRef:
        return cls(str(data["factory"]), str(data["root"]), data.get("binary"))


def open_runtime(ref: RuntimeRef) -> Runtime:
    """The driver ``ref`` names (imports its module; the monitor's way back to it)."""
    module, _, name = ref.factory.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"runtime driver {ref.factory!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise ConfigError(f"runtime driver {ref.factory!r} is not a Runtime")
    return cls(Path(ref.root), ref.binary)


class Runtime(ABC):
    """A container runtime with OCI runtime-spec verbs. State lives under :attr:`root`."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[RuntimeCapabilities]

    def __init__(self, root: Path, binary: str | None = None) -> None:
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


class OciCliRuntime(Runtime):
    """An OCI runtime CLI (runc, crun). Subclasses fix the binary name and capabilities."""

    def __init__(self, root: Path, binary: str | None = None) -> None:
        found = binary or shutil.which(self.name)
        if not found:
            raise ConfigError(
                f"OCI runtime {self.name!r} is not installed; apt-get install {self.name}"
            )
        self.binary = found
        super().__init__(root)

    def ref(self) -> RuntimeRef:
        return RuntimeRef(super().ref().factory, str(self.root), self.binary)

    # --- argv builders (pure; also used by the benchmark's bare baseline) ------------------

    def global_args(self, log_path: Path | None = None) -> list[str]:
        args = [self.binary, "--root", str(self.root)]
        if log_path is not None:
            args += ["--log", str(log_path), "--log-format", "json"]
        return args

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
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            *console,
            cid,
        ]

    def run_argv(self, cid: str, bundle: Path) -> list[str]:
        """Foreground ``run`` of a bundle: the bare-runtime baseline of the benchmark."""
        return [*self.global_args(), "run", "--bundle", str(bundle), cid]

    # --- commands ----------------------------------------------------------------------------

    def _run(
        self, cid: str, verb: str, *args: str, input_bytes: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        done = proc.run(
            [*self.global_args(), verb, *args],
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
            known = (self.root / cid).is_dir()
            hint = ("does not exist", "not found", "no such file or directory")
            if not known and any(t in low for t in hint):
                raise ContainerNotFoundError(f"{self.name}: container {cid} does not exist: {msg}")
            raise OciRuntimeError(f"{self.name} {verb} {cid} failed: {msg}")
        return done

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
        done = proc.run(
            self.create_argv(cid, bundle, pid_file, log_path, console_socket),
            what=f"{self.name} create {cid}",
            error=OciRuntimeError,
            timeout_s=COMMAND_TIMEOUT_S,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
        if done.returncode != 0:
            why = read_runtime_log(log_path) or f"exit status {done.returncode}"
            prefix = f"{self.name} create failed: "
            raise OciRuntimeError(prefix + why.removeprefix(prefix))

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
        args = [*self.global_args(), "exec"]
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
    capabilities = RuntimeCapabilities(update_pids=True, hybrid_cgroups_need_empty_v2=False)


class CrunRuntime(OciCliRuntime):
    name = "crun"
    capabilities = RuntimeCapabilities(update_pids=True, hybrid_cgroups_need_empty_v2=True)


RUNTIME_CLASSES: dict[str, type[Runtime]] = {"runc": RuncRuntime, "crun": CrunRuntime}


def get_runtime(name: str, state_dir: Path) -> Runtime:
    """The driver for ``name`` with its state under ``state_dir/runtime/<name>``."""
    try:
        cls = RUNTIME_CLASSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_CLASSES)}"
        ) from None
    return cls(state_dir / "runtime" / name)


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
    "Runtime",
    "RuntimeCapabilities",
    "RuntimeRef",
    "RuntimeState",
    "get_runtime",
    "open_runtime",
    "runtime_messages",
]
