"""The OCI runtime boundary: one :class:`Runtime` interface, runc and crun drivers.

The engine never re-implements namespaces; it writes a bundle and drives the runtime's CLI
(``create``/``start``/``state``/``kill``/``delete``/``update``/``exec``) through subprocess.
A runtime's own failure becomes :class:`OciRuntimeError` carrying its stderr (or its log file,
for ``create``, whose stdio belongs to the container). Each driver keeps its state under its
own ``--root`` inside the engine's state directory, so Tidal's containers never mix with
other users of the same binary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.errors import ConfigError, ContainerNotFoundError, OciRuntimeError

COMMAND_TIMEOUT_S = 60.0
"""No runtime command should take this long; a hung runtime must not hang the daemon."""


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
    """Where runc and crun differ in what the engine may rely on."""

    update_pids: bool
    hybrid_cgroups_need_empty_v2: bool
    """crun refuses cgroup v1+v2 hybrids whose v2 side has controllers (see hostprep)."""


class Runtime(ABC):
    """An OCI runtime CLI. Subclasses fix the binary name and capabilities."""

    name: str = ""
    capabilities: RuntimeCapabilities

    def __init__(self, root: Path, binary: str | None = None) -> None:
        found = binary or shutil.which(self.name)
        if not found:
            raise ConfigError(
                f"OCI runtime {self.name!r} is not installed; apt-get install {self.name}"
            )
        self.binary = found
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    # --- argv builders (pure; also used by the benchmark's bare baseline) ------------------

    def global_args(self, log_path: Path | None = None) -> list[str]:
        args = [self.binary, "--root", str(self.root)]
        if log_path is not None:
            args += ["--log", str(log_path), "--log-format", "json"]
        return args

    def create_argv(self, cid: str, bundle: Path, pid_file: Path, log_path: Path) -> list[str]:
        return [
            *self.global_args(log_path),
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            cid,
        ]

    def run_argv(self, cid: str, bundle: Path) -> list[str]:
        """Foreground ``run`` of a bundle: the bare-runtime baseline of the benchmark."""
        return [*self.global_args(), "run", "--bundle", str(bundle), cid]

    # --- commands ----------------------------------------------------------------------------

    def _run(
        self, cid: str, verb: str, *args: str, input_bytes: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [*self.global_args(), verb, *args]
        try:
            proc = subprocess.run(
                argv,
                input=input_bytes,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OciRuntimeError(
                f"{self.name} {verb} {cid} did not finish in {COMMAND_TIMEOUT_S:.0f}s"
            ) from exc
        if proc.returncode != 0:
            msg = _clean(proc.stderr) or _clean(proc.stdout) or f"exit status {proc.returncode}"
            low = msg.lower()
            if any(t in low for t in ("does not exist", "not found", "no such file or directory")):
                raise ContainerNotFoundError(f"{self.name}: container {cid} does not exist: {msg}")
            raise OciRuntimeError(f"{self.name} {verb} {cid} failed: {msg}")
        return proc

    def create(
        self,
        cid: str,
        bundle: Path,
        *,
        pid_file: Path,
        log_path: Path,
        stdout: int,
        stderr: int,
    ) -> None:
        """Create the container; its stdio are ``stdout``/``stderr`` (fds, e.g. a log file)."""
        try:
            proc = subprocess.run(
                self.create_argv(cid, bundle, pid_file, log_path),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OciRuntimeError(f"{self.name} create {cid} timed out") from exc
        if proc.returncode != 0:
            raise OciRuntimeError(
                f"{self.name} create {cid} failed: {read_runtime_log(log_path) or 'no message'}"
            )

    def start(self, cid: str) -> None:
        self._run(cid, "start", cid)

    def state(self, cid: str) -> RuntimeState | None:
        """The runtime's view, or None if it does not know the container."""
        try:
            proc = self._run(cid, "state", cid)
        except ContainerNotFoundError:
            return None
        data = json.loads(proc.stdout)
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
        """Delete the container (runs poststop hooks); unknown ids are not an error."""
        try:
            self._run(cid, "delete", *(["--force"] if force else []), cid)
        except ContainerNotFoundError:
            return

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        """Change cgroup limits of a running container (runtime-spec ``linux.resources``)."""
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
        timeout_s: float = 300.0,
    ) -> ExecResult:
        """Run a command inside the running container and collect its output."""
        args = [*self.global_args(), "exec"]
        for e in env or []:
            args += ["--env", e]
        if cwd:
            args += ["--cwd", cwd]
        args += [cid, *argv]
        try:
            proc = subprocess.run(
                args,
                input=stdin or b"",
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OciRuntimeError(
                f"exec {argv[0]!r} in {cid} ran longer than {timeout_s}s"
            ) from exc
        return ExecResult(proc.returncode, proc.stdout, proc.stderr)


class RuncRuntime(Runtime):
    name = "runc"
    capabilities = RuntimeCapabilities(update_pids=True, hybrid_cgroups_need_empty_v2=False)


class CrunRuntime(Runtime):
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


def _clean(raw: bytes) -> str:
    """One readable line out of runtime stderr (runc logs JSON lines, crun plain text)."""
    text = raw.decode(errors="replace").strip()
    msgs = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            msgs.append(line.strip())
            continue
        if isinstance(rec, dict) and rec.get("msg"):
            msgs.append(str(rec["msg"]))
    return "; ".join(m for m in msgs if m)[-2000:]


def read_runtime_log(path: Path) -> str:
    """Error lines from a runtime's ``--log`` file (JSON lines with level and msg)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return ""
    msgs = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if line.strip():
                msgs.append(line.strip())
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("level") in ("error", "fatal", "warning", None) and rec.get("msg"):
            msgs.append(str(rec["msg"]))
    return "; ".join(msgs)[-2000:]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def env_list(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    return [f"{k}={v}" for k, v in pairs]


__all__ = [
    "RUNTIME_CLASSES",
    "CrunRuntime",
    "ExecResult",
    "RuncRuntime",
    "Runtime",
    "RuntimeCapabilities",
    "RuntimeState",
    "get_runtime",
]
