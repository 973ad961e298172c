"""An fd store: a tiny holder process that keeps file descriptors alive for others.

A FUSE connection lives as long as some process holds its ``/dev/fuse`` file open. The node
service hands each connection's fds here (``put``) so that a crash or an upgrade of the
service does not end the connection (and with it every container reading that image); the
new service takes them back (``get``/``entry``) and resumes serving. nydus keeps its FUSE fd
in a supervisor for the same reason, and systemd's ``FDSTORE=1`` is the same idea.

The holder (``python -m tidal.blockdev.fdstore SOCKET``) does nothing else, so it has no
reason to die: it imports only the standard library, keeps a dict of ``name -> (fds, meta)``
and answers one request at a time on a unix SOCK_SEQPACKET socket. Requests and replies are
one JSON object per message, with fds riding along as SCM_RIGHTS. Callers are authenticated
by SO_PEERCRED: root, or the holder's own uid. One holder per socket, enforced by an
``flock`` on ``SOCKET.lock`` held for the holder's lifetime.

Hand-written rather than systemd's fd store: Tidal runs where systemd is not PID 1 (in a
container, in tests), and the protocol is forty lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidal import proc
from tidal.errors import FdStoreError

MAX_FDS_PER_ENTRY = 64
"""A FUSE connection's fds: the session fd plus one clone per serving thread."""
MAX_MESSAGE_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0
"""The holder is a bare interpreter with the standard library: it answers in ~50 ms."""
OOM_SCORE_ADJ = -1000
"""The holder is a few MB; if the OOM killer took it, every FUSE connection it holds would
end with it."""
REQUEST_TIMEOUT_S = 10.0
"""One request is one message each way; a client silent that long is stuck."""


@dataclass(frozen=True)
class FdEntry:
    """What the store holds under one name: fds (dups, now the caller's to close) and meta."""

    fds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class FdStore:
    """Client of the holder listening on ``socket_path``. Every call is one round trip."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)

    @classmethod
    def ensure(cls, socket_path: Path | str) -> FdStore:
        """The store at ``socket_path``, starting its holder (detached, in its own session) if
        none answers there."""
        store = cls(socket_path)
        if store.alive():
            return store
        store.socket_path.parent.mkdir(parents=True, exist_ok=True)
        log_path = store.socket_path.with_name(store.socket_path.name + ".log")
        with open(log_path, "ab") as log_file, open(os.devnull, "rb") as devnull:
            starter = proc.spawn(
                [sys.executable, "-m", "tidal.blockdev.fdstore", "--detach", store.socket_path],
                what=f"starting the fd store holder at {store.socket_path}",
                error=FdStoreError,
                stdin=devnull,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # outlives the caller: that is its purpose
            )
            starter.wait(START_TIMEOUT_S)  # it forks the holder (init's child, not ours)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if store.alive():
                return store
            time.sleep(0.02)
        raise FdStoreError(
            f"fd store holder at {store.socket_path} did not answer within "
            f"{START_TIMEOUT_S:.0f} s of starting; see {log_path}"
        )

    def alive(self) -> bool:
        try:
            self.holder_pid()
        except FdStoreError:
            return False
        return True

    def holder_pid(self) -> int:
        return int(self._call({"op": "ping"})[0]["pid"])

    def put(
        self,
        name: str,
        fd: int,
        *,
        extra_fds: Sequence[int] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Hold (dups of) ``fd`` and ``extra_fds`` under ``name``, replacing what was there.
        The caller keeps its own fds."""
        self._call({"op": "put", "name": name, "meta": dict(meta or {})}, [fd, *extra_fds])

    def get(self, name: str) -> int | None:
        """A dup of the first fd held under ``name`` (the caller closes it), or None."""
        entry = self.entry(name)
        if entry is None:
            return None
        first, *rest = entry.fds
        FdEntry(rest).close()
        return first

    def entry(self, name: str) -> FdEntry | None:
        """Dups of every fd held under ``name`` and its meta, or None."""
        reply, fds = self._call({"op": "get", "name": name})
        if not reply.get("found"):
            return None
        return FdEntry(fds, dict(reply.get("meta") or {}))

    def drop(self, name: str) -> None:
        """Close what is held under ``name`` (nothing if there is nothing)."""
        self._call({"op": "drop", "name": name})

    def names(self) -> list[str]:
        return [str(n) for n in self._call({"op": "names"})[0]["names"]]

    def _call(
        self, request: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(REQUEST_TIMEOUT_S)
                sock.connect(str(self.socket_path))
                socket.send_fds(sock, [json.dumps(request).encode()], list(fds))
                data, got, _flags, _addr = socket.recv_fds(
                    sock, MAX_MESSAGE_BYTES, MAX_FDS_PER_ENTRY
                )
        except OSError as exc:
            raise FdStoreError(
                f"fd store at {self.socket_path} did not answer {request['op']!r}: {exc}"
            ) from exc
        try:
            reply = json.loads(data)
        except ValueError as exc:
            FdEntry(got).close()
            raise FdStoreError(f"fd store at {self.socket_path} sent {data[:80]!r}") from exc
        if "error" in reply:
            FdEntry(got).close()
            raise FdStoreError(f"fd store at {self.socket_path}: {reply['error']}")
        return reply, got


# --- the holder -------------------------------------------------------------------------------


class _Holder:
    def __init__(self) -> None:
        self.entries: dict[str, tuple[list[int], dict[str, Any]]] = {}

    def drop(self, name: str) -> None:
        fds, _meta = self.entries.pop(name, ([], {}))
        FdEntry(fds).close()

    def handle(self, request: Any, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """One request -> one reply and the fds to send with it (the holder's own: sent, kept)."""
        op = request.get("op") if isinstance(request, dict) else None
        name = request.get("name") if isinstance(request, dict) else None
        if op == "ping":
            return {"pid": os.getpid()}, []
        if op == "names":
            return {"names": sorted(self.entries)}, []
        if not isinstance(name, str) or not name:
            return {"error": f"request {op!r} needs a non-empty name"}, []
        if op == "put":
            if not fds:
                return {"error": f"put {name!r} came without a file descriptor"}, []
            meta = request.get("meta")
            self.drop(name)
            self.entries[name] = (list(fds), meta if isinstance(meta, dict) else {})
            fds.clear()  # now held
            return {"ok": True}, []
        if op == "get":
            held = self.entries.get(name)
            if held is None:
                return {"found": False}, []
            return {"found": True, "meta": held[1]}, held[0]
        if op == "drop":
            self.drop(name)
            return {"ok": True}, []
        return {"error": f"unknown request {op!r}"}, []


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def serve(socket_path: Path) -> int:
    """Hold fds for callers of ``socket_path`` until killed. Returns 0 at once if another
    holder already owns the socket."""
    lock = os.open(f"{socket_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fd store: another holder serves {socket_path}", file=sys.stderr)
        return 0
    try:  # the OOM killer must pick anyone else (root only; some sandboxes refuse even root)
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError as exc:
        print(f"fd store: the OOM killer may pick this holder ({exc})", file=sys.stderr)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # stale: its holder is gone (we hold the lock)
    holder = _Holder()
    old_umask = os.umask(0o077)
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    print(f"fd store: holding fds at {socket_path} (pid {os.getpid()})", file=sys.stderr)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            fds: list[int] = []
            out: list[int] = []
            reply: dict[str, Any]
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    conn, MAX_MESSAGE_BYTES, MAX_FDS_PER_ENTRY
                )
                if not _peer_allowed(conn):
                    reply = {"error": "only root or the holder's own uid may use it"}
                else:
                    try:
                        request = json.loads(data)
                    except ValueError:
                        request = None
                    reply, out = holder.handle(request, fds)
                socket.send_fds(conn, [json.dumps(reply).encode()], out)
            except OSError as exc:
                print(f"fd store: a request failed: {exc}", file=sys.stderr)
            finally:
                FdEntry(fds).close()  # what a refused or failed request brought


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    detach = args[:1] == ["--detach"]
    args = args[1:] if detach else args
    if len(args) != 1:
        print("usage: python -m tidal.blockdev.fdstore [--detach] SOCKET", file=sys.stderr)
        return 2
    if detach and os.fork():
        os._exit(0)  # the starter returns at once; the holder is reparented to init
    return serve(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
