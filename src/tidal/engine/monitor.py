"""Per-container monitor: the parent of a container, so it outlives the daemon and its exit is known.

The daemon starts one monitor per container start (``python -m tidal.engine.monitor CONF``)
in a session of its own. The monitor makes itself a child subreaper, runs the runtime's
``create`` (container stdio = the log file) and ``start``, reports ``{"ok": true, "pid": N}``
(or the runtime's error) on a pipe the daemon reads, forwards published ports, and then waits
for the container's init. When it exits the monitor records the truth in ``exit.json``: exit
code, terminating signal, whether the memory cgroup OOM-killed anything. Then it runs the
runtime's ``delete``, which runs the poststop hooks; so poststop runs after crashes too.

Because the container's stdio are files and its exit lands in a file, a SIGKILLed daemon loses
nothing: on restart it reads ``exit.json`` or finds the monitor still waiting. Only the standard
library is imported here: this process sits on the start path and must start fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _report(fd: int, payload: dict[str, Any]) -> None:
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(payload) + "\n").encode())
        os.close(fd)


def _runtime_log(path: str) -> str:
    msgs = []
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    msgs.append(line.strip())
                    continue
                if isinstance(rec, dict) and rec.get("msg"):
                    msgs.append(str(rec["msg"]))
    except OSError:
        pass
    return "; ".join(m for m in msgs if m)[-1500:]


def read_oom_kills(paths: list[str]) -> int:
    """OOM kills counted by the container's memory cgroup (v1 ``memory.oom_control`` or v2
    ``memory.events``), or 0 when neither file exists."""
    for path in paths:
        try:
            with open(path) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def open_listeners(ports: list[dict[str, Any]]) -> list[tuple[socket.socket, tuple[str, int]]]:
    out: list[tuple[socket.socket, tuple[str, int]]] = []
    for p in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((p["host_ip"], p["host_port"]))
        except OSError as exc:
            sock.close()
            for s, _ in out:
                s.close()
            raise OSError(f"host port {p['host_port']} cannot be bound: {exc.strerror}") from exc
        sock.listen(128)
        out.append((sock, (p["target_ip"], p["container_port"])))
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


def run(conf: dict[str, Any], ready_fd: int) -> int:
    _set_subreaper()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    log_fd = os.open(conf["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(conf["exit_path"])
    created = subprocess.run(
        conf["create_argv"], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, check=False
    )
    os.close(log_fd)
    if created.returncode != 0:
        why = _runtime_log(conf["runtime_log"]) or f"exit status {created.returncode}"
        prefix = f"{conf['runtime']} create failed: "
        _report(ready_fd, {"ok": False, "error": prefix + why.removeprefix(prefix)})
        subprocess.run(conf["delete_argv"] + ["--force", conf["id"]], capture_output=True)
        return 1
    with open(conf["pid_file"]) as fh:
        pid = int(fh.read().strip())
    listeners: list[tuple[socket.socket, tuple[str, int]]] = []
    try:
        listeners = open_listeners(conf.get("ports", []))
    except OSError as exc:
        _report(ready_fd, {"ok": False, "error": str(exc)})
        subprocess.run(conf["delete_argv"] + ["--force", conf["id"]], capture_output=True)
        return 1
    started = subprocess.run(conf["start_argv"], capture_output=True, check=False)
    if started.returncode != 0:
        why = started.stderr.decode(errors="replace").strip() or _runtime_log(conf["runtime_log"])
        _report(ready_fd, {"ok": False, "error": f"{conf['runtime']} start failed: {why}"})
        subprocess.run(conf["delete_argv"] + ["--force", conf["id"]], capture_output=True)
        return 1
    started_at = time.time()
    write_json_atomic(conf["started_path"], {"pid": pid, "started_at": started_at})
    for sock, target in listeners:
        threading.Thread(target=_serve_port, args=(sock, target), daemon=True).start()
    _report(
        ready_fd, {"ok": True, "pid": pid, "started_at": started_at, "monitor_pid": os.getpid()}
    )

    status = wait_for(pid)
    finished_at = time.time()
    for sock, _ in listeners:
        sock.close()
    exit_code: int | None = None
    sig: int | None = None
    if status == -1:
        pass
    elif os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        exit_code = 128 + sig
    oom = read_oom_kills(conf.get("oom_files", [])) > 0
    write_json_atomic(
        conf["exit_path"],
        {
            "exit_code": exit_code,
            "signal": sig,
            "oom_killed": oom,
            "finished_at": finished_at,
            "pid": pid,
        },
    )
    # delete runs the poststop hooks and removes the cgroup.
    deleted = subprocess.run(conf["delete_argv"] + [conf["id"]], capture_output=True, check=False)
    if deleted.returncode != 0:
        subprocess.run(conf["delete_argv"] + ["--force", conf["id"]], capture_output=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tidal.engine.monitor CONF.json|- READY_FD", file=sys.stderr)
        return 2
    # Detach from the daemon: it reaps the short-lived parent at once, and the monitor is
    # adopted by init (or the nearest subreaper), so a dead daemon leaves no zombie behind.
    if os.fork() > 0:
        os._exit(0)
    if args[0] == "-":
        # Pre-launched: the engine started this interpreter while it prepared storage and
        # sends the configuration when the bundle is ready (EOF: the start was abandoned).
        raw = sys.stdin.buffer.read()
        if not raw:
            return 0
        conf = json.loads(raw)
    else:
        with open(args[0]) as fh:
            conf = json.load(fh)
    if conf.get("monitor_log"):
        fd = os.open(conf["monitor_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return run(conf, int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
