"""Per-container monitor: the parent of a container, so it outlives the daemon and its exit is known.

The daemon starts one monitor per container start (``python -m tidal.engine.monitor - FD``) in
a session of its own and sends it a :class:`MonitorConfig`. The monitor makes itself a child
subreaper, rebuilds the container's :class:`~tidal.engine.runtime.Runtime` from the config's
:class:`~tidal.engine.runtime.RuntimeRef` and drives it: ``create`` (container stdio = the log
file), ``start``; or both in one runtime command (``run --detach``) when there is no terminal
to receive and no port to open between them, one runtime start-up fewer. It records each step in ``start.json`` (a :class:`StartReport`: first
"starting", then "running" with the pid or "failed" with the reason) *before* it reports the
same on a pipe the daemon reads, so a daemon SIGKILLed in between finds the truth on restart.
Then it forwards published ports and waits for the container's init. The container's stdout
and stderr go to the log file; with ``-i`` the monitor holds the write end of its stdin, with
``-t`` its pty master (sent by the runtime to a console socket), and serves both on
``attach.sock`` (:mod:`tidal.engine.attach`), so an attached terminal does not depend on the
daemon either. When it exits the monitor
writes ``exit.json`` (an :class:`ExitRecord`: exit code, terminating signal, whether the
memory cgroup OOM-killed anything) and runs the runtime's ``delete``, which runs the poststop
hooks; so poststop runs after crashes too.

Only the standard library and Tidal's small core and runtime driver are imported here: this
process is started ahead of the start it serves (the engine's monitor pool), so its imports
are off the start path, but a cold start still pays them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tidal.engine import attach, crilog, mountview
from tidal.engine.runtime import Runtime, RuntimeRef, open_runtime
from tidal.errors import CgroupError, TidalError
from tidal.fsutil import write_json_atomic

PR_SET_CHILD_SUBREAPER = 36
CONTAINERS_DIR = "containers"
"""Below the engine's state directory: a directory per container (kept one by one in the
runtime's view)."""
RELAY_DRAIN_S = 2.0
"""How long an exited container's output relays may take to reach EOF."""
PARTIAL_FLUSH_S = 0.05
"""Output without a newline reaches ``container.log`` once its stream is this quiet."""
PARTIAL_FLUSH_BYTES = 65536
START_FILE = "start.json"
EXIT_FILE = "exit.json"


@dataclass(frozen=True)
class PortForward:
    host_ip: str
    host_port: int
    container_port: int
    target_ip: str | None


@dataclass(frozen=True)
class MonitorConfig:
    """Everything one monitor run needs; travels as JSON on the monitor's stdin."""

    id: str
    runtime: RuntimeRef
    bundle: str
    start_seq: int
    """The container's start number (record ``starts`` + 1): ties reports to this start."""
    cdir: str
    cgroup: str
    cgroup_root: str = "/sys/fs/cgroup"
    """The engine passes :data:`tidal.cgroups.CGROUP_ROOT` (not imported here: start path)."""
    ports: tuple[PortForward, ...] = ()
    interactive: bool = False
    """Keep the container's stdin open for attached clients (``tidal run -i``)."""
    tty: bool = False
    """The container has a terminal; the monitor relays it (``tidal run -t``)."""
    cri_log: crilog.CriLogSpec | None = None
    """Also write the output in the kubelet's layout (:mod:`tidal.engine.crilog`); the
    container's stdout and stderr are then two pipes the monitor relays, told apart there
    (without it both are the log file itself). Not with ``tty`` (a terminal has one stream)."""
    mount_view: str = ""
    """The engine's anchor (:mod:`tidal.engine.mountview`): the runtime's create runs in a
    view without the other containers' mounts below it; empty: in the host's."""

    @property
    def attach_path(self) -> str:
        return os.path.join(self.cdir, attach.ATTACH_SOCKET)

    @property
    def log_path(self) -> str:
        return os.path.join(self.cdir, "container.log")

    @property
    def runtime_log(self) -> str:
        return os.path.join(self.cdir, "runtime.log")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.cdir, "pid")

    @property
    def start_path(self) -> str:
        return os.path.join(self.cdir, START_FILE)

    @property
    def exit_path(self) -> str:
        return os.path.join(self.cdir, EXIT_FILE)

    @property
    def monitor_log(self) -> str:
        return os.path.join(self.cdir, "monitor.log")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["runtime"] = self.runtime.to_json()
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MonitorConfig:
        d = dict(data)
        d["runtime"] = RuntimeRef.from_json(d["runtime"])
        d["ports"] = tuple(PortForward(**p) for p in d.get("ports") or ())
        if d.get("cri_log"):
            d["cri_log"] = crilog.CriLogSpec(**d["cri_log"])
        return cls(**d)


@dataclass(frozen=True)
class StartReport:
    """What became of one start: ``starting`` (the monitor has its config), ``running``
    (``pid`` is the container's init) or ``failed`` (``error`` says why)."""

    state: str
    start_seq: int
    monitor_pid: int
    pid: int = 0
    started_at: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StartReport:
        return cls(**data)


@dataclass(frozen=True)
class ExitRecord:
    """How the container's init ended (``exit_code`` None: not known, e.g. not our child)."""

    exit_code: int | None
    signal: int | None
    oom_killed: bool
    finished_at: float
    pid: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitRecord:
        return cls(
            exit_code=data.get("exit_code"),
            signal=data.get("signal"),
            oom_killed=bool(data.get("oom_killed")),
            finished_at=float(data.get("finished_at") or 0.0),
            pid=int(data.get("pid") or 0),
        )


def read_start_report(cdir: Path) -> StartReport | None:
    try:
        return StartReport.from_json(json.loads((cdir / START_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_exit_record(cdir: Path) -> ExitRecord | None:
    try:
        return ExitRecord.from_json(json.loads((cdir / EXIT_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _ignore_signal(signum: int, frame: object) -> None:
    """The monitor outlives terminal hang-ups and stray signals to its session."""


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _report(conf: MonitorConfig, fd: int, report: StartReport) -> None:
    """Record first (survives a dead daemon), then tell the daemon on its pipe.

    No fsync: the page cache survives a killed daemon, and a host crash ends the container
    anyway; an fsync here would sit on every start's critical path."""
    write_json_atomic(conf.start_path, report.to_json())
    if report.state == "starting" or fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(report.to_json()) + "\n").encode())
        os.close(fd)


def _oom_kills(conf: MonitorConfig) -> int:
    from tidal.cgroups import detect_cgroupfs  # after the container exited: off the start path

    try:
        fs = detect_cgroupfs(Path(conf.cgroup_root))
    except CgroupError:
        return 0
    return fs.oom_kills(conf.cgroup)


# --- port forwarding -----------------------------------------------------------------------


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve_port(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue

        def run(c: socket.socket = client, u: socket.socket = upstream) -> None:
            t = threading.Thread(target=_pump, args=(u, c), daemon=True)
            t.start()
            _pump(c, u)
            t.join()
            c.close()
            u.close()

        threading.Thread(target=run, daemon=True).start()


def open_listeners(ports: tuple[PortForward, ...]) -> list[tuple[socket.socket, tuple[str, int]]]:
    out: list[tuple[socket.socket, tuple[str, int]]] = []
    for p in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((p.host_ip, p.host_port))
        except OSError as exc:
            sock.close()
            for s, _ in out:
                s.close()
            raise OSError(f"host port {p.host_port} cannot be bound: {exc.strerror}") from exc
        sock.listen(128)
        out.append((sock, (p.target_ip or "127.0.0.1", p.container_port)))
    return out


# --- main ----------------------------------------------------------------------------------


def wait_for(pid: int) -> int:
    """Reap children (we are a subreaper) until ``pid`` exits; return its wait status."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            # Not our child (should not happen): poll until it disappears.
            while os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)
            return -1
        except InterruptedError:
            continue
        if got == pid:
            return status


class _Stdio:
    """The container's stdio and who holds it: the log file always; with ``-i`` a stdin
    pipe, with ``-t`` the pty master the runtime sends; then the attach server, which takes
    over the pipe's write end and the master. With a CRI log, stdout and stderr are two pipes
    relayed by two threads into the log file (as before: ``tidal logs`` reads it) and, told
    apart, into the CRI file. :meth:`close` releases whatever is held."""

    def __init__(self, conf: MonitorConfig) -> None:
        self.conf = conf
        self.log_fd = -1
        self.stdin_r = self.stdin_w = self.master_fd = -1
        self.out_w = self.err_w = self.cri_fd = -1
        self.console: tuple[str, socket.socket] | None = None
        self.server: attach.AttachServer | None = None
        self.relays: list[threading.Thread] = []
        self._relay_fds: list[int] = []

    @property
    def stdout(self) -> int:
        return self.out_w if self.out_w >= 0 else self.log_fd

    @property
    def stderr(self) -> int:
        return self.err_w if self.err_w >= 0 else self.log_fd

    def prepare(self) -> None:
        """Before ``create``: the log, and the stdin pipe or the console socket."""
        self.log_fd = os.open(self.conf.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if self.conf.tty:
            self.console = _console_listener()
        elif self.conf.interactive:
            self.stdin_r, self.stdin_w = os.pipe()
        if self.conf.cri_log is not None and not self.conf.tty:
            self.cri_fd = crilog.open_log(self.conf.cri_log, self.conf.start_seq - 1, self.conf.id)
            out_r, self.out_w = os.pipe()
            err_r, self.err_w = os.pipe()
            self._relay_fds = [out_r, err_r]

    def _relay(self, fds: list[int], log_fd: int, cri_fd: int) -> None:
        """Both streams, in one thread, until the container's last holder closes them: CRI
        lines to the CRI file, and the raw bytes to the log file in whole lines, so that the
        two streams interleave there by lines, as they did when both were the log file itself
        (a rest without a newline goes out once its stream has been quiet for
        :data:`PARTIAL_FLUSH_S`, or has :data:`PARTIAL_FLUSH_BYTES`). The fds are copies of
        its own, so :meth:`close` never leaves it writing to a number reused meanwhile."""
        sel = selectors.DefaultSelector()
        for fd, stream in zip(fds, crilog.STREAMS, strict=True):
            sel.register(fd, selectors.EVENT_READ, _Stream(crilog.CriLogWriter(cri_fd, stream)))

        def flush(st: _Stream) -> None:
            if st.rest:
                with contextlib.suppress(OSError):
                    _write_all(log_fd, bytes(st.rest))
                st.rest.clear()

        try:
            while sel.get_map():
                streams = [key.data for key in sel.get_map().values()]
                waiting = any(st.rest for st in streams)
                for key, _ in sel.select(PARTIAL_FLUSH_S if waiting else None):
                    st = key.data
                    try:
                        data = os.read(key.fd, 65536)
                    except InterruptedError:
                        continue
                    if not data:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        flush(st)
                        with contextlib.suppress(OSError):
                            st.writer.close()
                        continue
                    st.last = time.monotonic()
                    st.rest += data
                    cut = st.rest.rfind(b"\n") + 1
                    if cut:
                        with contextlib.suppress(OSError):
                            _write_all(log_fd, bytes(st.rest[:cut]))
                        del st.rest[:cut]
                    with contextlib.suppress(OSError):
                        st.writer.write(data)
                now = time.monotonic()
                for st in streams:
                    if len(st.rest) >= PARTIAL_FLUSH_BYTES or now - st.last >= PARTIAL_FLUSH_S:
                        flush(st)
        finally:
            for key in list(sel.get_map().values()):
                os.close(key.fd)
            sel.close()
            os.close(log_fd)
            os.close(cri_fd)

    def start_relays(self) -> None:
        """After ``create``: the container holds the pipes' write ends; ours go."""
        self._close_fd("out_w")
        self._close_fd("err_w")
        own = (os.dup(self.log_fd), os.dup(self.cri_fd))
        t = threading.Thread(target=self._relay, args=(self._relay_fds, *own), daemon=True)
        t.start()
        self.relays.append(t)
        self._relay_fds = []

    def drain(self, timeout_s: float = RELAY_DRAIN_S) -> None:
        """After the container's exit: its last output reaches both logs (a process it left
        holding a pipe open is not waited for longer than ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        for t in self.relays:
            t.join(max(0.0, deadline - time.monotonic()))

    def created(self) -> None:
        """After ``create``: take the terminal; drop what only the runtime needed."""
        if self.console is not None:
            self.master_fd = attach.receive_fd(self.console[1])
        self._drop_setup()
        if self._relay_fds:
            self.start_relays()

    def serve(self) -> None:
        """Serve the attach socket (``-i``/``-t``); else the log is the container's alone
        (or its relays')."""
        if not (self.conf.tty or self.conf.interactive):
            if not self.relays:
                self._close_fd("log_fd")
            return
        self.server = attach.AttachServer(
            self.conf.attach_path,
            master_fd=self.master_fd if self.master_fd >= 0 else None,
            stdin_fd=self.stdin_w if self.stdin_w >= 0 else None,
            log_fd=self.log_fd,
        )
        self.master_fd = self.stdin_w = -1  # the server owns them now

    def close(self, exit_status: int | None = None) -> None:
        self._drop_setup()
        if self.server is not None:
            self.server.finish(exit_status)
            self.server = None
        for name in ("out_w", "err_w"):  # a failed start: the relays see EOF
            self._close_fd(name)
        for fd in self._relay_fds:
            os.close(fd)
        self._relay_fds = []
        for name in ("log_fd", "stdin_w", "master_fd", "cri_fd"):
            self._close_fd(name)

    def _drop_setup(self) -> None:
        self._close_fd("stdin_r")
        if self.console is not None:
            _drop_console_listener(*self.console)
            self.console = None

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            setattr(self, name, -1)
            os.close(fd)


@dataclass
class _Stream:
    """One relayed stream: its CRI writer, and what it wrote since its last newline."""

    writer: crilog.CriLogWriter
    rest: bytearray = field(default_factory=bytearray)
    last: float = 0.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _console_listener() -> tuple[str, socket.socket]:
    """A socket for the runtime's ``--console-socket`` in a private directory of its own:
    the runtime connects by path, and a container directory's path may be too long."""
    import tempfile  # -t only: off the start path of every other container

    d = tempfile.mkdtemp(prefix="tidal-console-")
    path = os.path.join(d, "console.sock")
    try:
        return path, attach.listen(path)
    except OSError:
        os.rmdir(d)
        raise


def _drop_console_listener(path: str, sock: socket.socket) -> None:
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def _force_delete(rt: Runtime, cid: str) -> None:
    try:
        rt.delete(cid, force=True)
    except TidalError as exc:
        print(f"cleanup after a failed start: {exc}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _runtime_view(conf: MonitorConfig) -> Iterator[None]:
    """The mount namespace of the runtime's create: without the other containers' mounts
    when the engine has an anchor (a monitor is single-threaded until after create)."""
    if not conf.mount_view:
        yield
        return
    try:
        with open(os.path.join(conf.bundle, "config.json"), "rb") as fh:
            keep = mountview.kept_dirs(json.load(fh), conf.mount_view, (CONTAINERS_DIR,))
    except (OSError, ValueError):  # the runtime reports the bundle's problem, in the host's
        yield
        return
    if conf.cdir not in keep:
        keep.append(conf.cdir)
    with mountview.trimmed_view(conf.mount_view, keep) as why:
        if why is not None:
            print(f"runtime runs beside all mounts: {why}", file=sys.stderr, flush=True)
        yield


def run(conf: MonitorConfig, ready_fd: int) -> int:
    _set_subreaper()
    # Caught, not ignored: an ignored disposition would be inherited by the container across
    # exec (and a shell cannot trap a signal ignored on entry); a handler is reset to default.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # subprocess restores it in children
    me = os.getpid()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(conf.exit_path)
    _report(conf, ready_fd, StartReport("starting", conf.start_seq, me))

    def failed(why: str) -> int:
        _report(conf, ready_fd, StartReport("failed", conf.start_seq, me, error=why))
        return 1

    try:
        rt = open_runtime(conf.runtime)
    except TidalError as exc:
        return failed(str(exc))
    stdio = _Stdio(conf)
    # nothing to set up between create and start (no pty to receive, no port to bind): both
    # in one runtime command (Runtime.run_detached), one runtime start-up fewer
    one_step = not (conf.tty or conf.ports)
    try:
        stdio.prepare()
        first_step = (
            rt.run_detached
            if one_step
            else partial(
                rt.create, console_socket=Path(stdio.console[0]) if stdio.console else None
            )
        )
        with _runtime_view(conf):
            first_step(
                conf.id,
                Path(conf.bundle),
                pid_file=Path(conf.pid_file),
                log_path=Path(conf.runtime_log),
                stdout=stdio.stdout,
                stderr=stdio.stderr,
                stdin=stdio.stdin_r if stdio.stdin_r >= 0 else None,
            )
        stdio.created()
    except (TidalError, OSError) as exc:
        stdio.close()
        _force_delete(rt, conf.id)
        return failed(str(exc))
    with open(conf.pid_file) as fh:
        pid = int(fh.read().strip())
    listeners: list[tuple[socket.socket, tuple[str, int]]] = []
    try:
        listeners = open_listeners(conf.ports)
        stdio.serve()
    except OSError as exc:
        for sock, _ in listeners:
            sock.close()
        stdio.close()
        _force_delete(rt, conf.id)
        return failed(str(exc))
    if not one_step:
        try:
            rt.start(conf.id)
        except TidalError as exc:
            stdio.close()
            _force_delete(rt, conf.id)
            return failed(f"{rt.name} start failed: {exc}")
    for sock, target in listeners:
        threading.Thread(target=_serve_port, args=(sock, target), daemon=True).start()
    _report(conf, ready_fd, StartReport("running", conf.start_seq, me, pid, time.time()))

    by_id = rt.wait_exit(conf.id, pid)  # a runsc pod member: its pid is the pod's sandbox
    status = wait_for(pid) if by_id is None else -1
    finished_at = time.time()
    for sock, _ in listeners:
        sock.close()
    exit_code: int | None = by_id
    sig: int | None = None
    if status == -1:
        pass
    elif os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        exit_code = 128 + sig
    oom = rt.capabilities.reports_oom and _oom_kills(conf) > 0
    record = ExitRecord(exit_code, sig, oom, finished_at, pid)
    if stdio.server is not None:  # the terminal's last output reaches the log before the record
        stdio.server.drain()
    stdio.drain()
    write_json_atomic(conf.exit_path, record.to_json(), fsync=True)
    stdio.close(exit_code)
    # delete runs the poststop hooks and removes the cgroup.
    try:
        rt.delete(conf.id)
    except TidalError:
        _force_delete(rt, conf.id)
    return 0


ZYGOTE_FLAG = "--zygote"
ZYGOTE_MAX_MESSAGE = 1 << 20
"""The largest configuration the zygote takes (one SOCK_SEQPACKET message)."""


def zygote(sock_fd: int) -> int:
    """Fork a monitor per request, already imported: the engine's zygote (``--zygote FD``).

    Each request on the SOCK_SEQPACKET socket ``sock_fd`` is a :class:`MonitorConfig` as
    JSON with the ready pipe's write end attached (SCM_RIGHTS). The zygote forks; the child
    starts a session of its own and forks again (the monitor is adopted by init, as one
    started by ``main`` is), and the zygote answers with the monitor's pid. Why: a monitor
    started as a new interpreter pays Python's start-up and these imports (~150 ms of CPU
    here, 12 MiB of private memory), twice per instance; a fork pays neither, and the
    monitors share the imported pages. The zygote stays single-threaded (it forks), and
    exits on EOF: the engine closed, or its daemon died (running monitors are not its
    children and live on).
    """
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, ZYGOTE_MAX_MESSAGE, 1)
        except OSError:
            return 0
        if not msg:
            for fd in fds:
                os.close(fd)
            return 0
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                sock.send(b"0")
            continue
        ready = fds[0]
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                sock.close()
                os.close(r)
                os.setsid()
                grandchild = os.fork()
                if grandchild > 0:
                    os.write(w, str(grandchild).encode())
                    os._exit(0)
                os.close(w)
                code = _serve(MonitorConfig.from_json(json.loads(msg)), ready)
            except BaseException as exc:  # the monitor's own errors are in its log
                with contextlib.suppress(Exception):
                    print(f"monitor failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        os.close(ready)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            pid = fh.read()
        os.waitpid(child, 0)
        try:
            sock.send(pid or b"0")
        except OSError:
            return 0


def _serve(conf: MonitorConfig, ready_fd: int) -> int:
    """The monitor's stdio (its log; stdin /dev/null), then :func:`run`."""
    fd = os.open(conf.monitor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return run(conf, ready_fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == ZYGOTE_FLAG:
        return zygote(int(args[1]))
    if len(args) != 2:
        print("usage: python -m tidal.engine.monitor CONF.json|- READY_FD", file=sys.stderr)
        return 2
    # Detach from the daemon: it reaps the short-lived parent at once, and the monitor is
    # adopted by init (or the nearest subreaper), so a dead daemon leaves no zombie behind.
    if os.fork() > 0:
        os._exit(0)
    if args[0] == "-":
        # Started ahead of time (the engine's monitor pool): the configuration arrives when a
        # container's bundle is ready (EOF: the engine closed or its daemon died).
        raw = sys.stdin.buffer.read()
        if not raw:
            return 0
        conf = MonitorConfig.from_json(json.loads(raw))
    else:
        with open(args[0]) as fh:
            conf = MonitorConfig.from_json(json.load(fh))
    return _serve(conf, int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
