"""Container logs as the kubelet lays them out (the CRI log format), so a node's log shipper
reads Tidal's instances unchanged.

The kubelet asks its runtime to write each container's output to
``/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log``, and links
``/var/log/containers/<pod>_<namespace>_<container>-<id>.log`` to it. Each line is
``<RFC3339Nano time> <stdout|stderr> <F|P> <text>\\n``: ``F`` ends a line of the container's
output, ``P`` is a piece of one longer than the runtime's limit (containerd's
``max_container_log_line_size``, 16 KiB by default) or a last piece the stream ended without
a newline (containerd does the same: its reader only sees a full line when it sees ``\\n``).

:class:`LineSplitter` is the pure part (bytes in, tagged pieces out); :class:`CriLogWriter`
appends one stream's pieces to the file, one ``write`` per line, so the two streams of a
container interleave by whole lines in one file. Only the standard library is used: the
container monitor imports this module.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

MAX_LINE_BYTES = 16 * 1024
"""containerd's default ``max_container_log_line_size``: longer lines become ``P`` pieces."""
FULL, PARTIAL = b"F", b"P"
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class CriLogSpec:
    """Where a container's CRI log goes: ``<directory>/<restart>.log`` (the restart number
    is the container's start count minus one, as the kubelet's restart count), linked from
    ``<link_dir>/<link_stem>-<container id>.log`` (``link_dir`` empty: no link)."""

    directory: str
    link_dir: str = ""
    link_stem: str = ""

    def log_path(self, restart: int) -> str:
        return os.path.join(self.directory, f"{restart}.log")

    def link_path(self, container_id: str) -> str | None:
        if not self.link_dir:
            return None
        return os.path.join(self.link_dir, f"{self.link_stem}-{container_id}.log")


def timestamp(ns: int) -> bytes:
    """Go's ``time.RFC3339Nano`` in UTC (trailing zeros of the fraction dropped, as Go does):
    what containerd writes and the kubelet parses."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}{'.' + digits if digits else ''}Z".encode()


def cri_line(ns: int, stream: str, tag: bytes, text: bytes) -> bytes:
    """One line of the file; ``text`` without its newline."""
    return b"%s %s %s %s\n" % (timestamp(ns), stream.encode(), tag, text)


class LineSplitter:
    """Cuts one stream into CRI pieces: each ``\\n``-ended line is ``F`` (a ``\\r`` before the
    newline goes with it, as Go's ``ReadLine``), a line longer than ``max_bytes`` is ``P``
    pieces of ``max_bytes`` then its rest as ``F``; :meth:`close` gives what the stream left
    without a newline as ``P``."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"a CRI line limit must be at least 1 byte, got {max_bytes}")
        self.max_bytes = max_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", 0, self.max_bytes + 1)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                out.append((FULL, line.removesuffix(b"\r")))
            elif len(self._buf) > self.max_bytes:
                out.append((PARTIAL, bytes(self._buf[: self.max_bytes])))
                del self._buf[: self.max_bytes]
            else:
                return out

    def close(self) -> list[tuple[bytes, bytes]]:
        rest, self._buf = bytes(self._buf), bytearray()
        return [(PARTIAL, rest)] if rest else []


class CriLogWriter:
    """One stream of one container into its CRI log file (opened ``O_APPEND``, shared with
    the container's other stream: each line is one ``write``, so lines never tear)."""

    def __init__(self, fd: int, stream: str, max_bytes: int = MAX_LINE_BYTES) -> None:
        if stream not in STREAMS:
            raise ValueError(f"a CRI stream is stdout or stderr, not {stream!r}")
        self.fd = fd
        self.stream = stream
        self.splitter = LineSplitter(max_bytes)

    def write(self, data: bytes) -> None:
        self._emit(self.splitter.feed(data))

    def close(self) -> None:
        self._emit(self.splitter.close())

    def _emit(self, pieces: list[tuple[bytes, bytes]]) -> None:
        if not pieces:
            return
        now = time.time_ns()
        for tag, text in pieces:
            os.write(self.fd, cri_line(now, self.stream, tag, text))


def open_log(spec: CriLogSpec, restart: int, container_id: str) -> int:
    """Make the directory, open ``<restart>.log`` for appending, and point the
    ``/var/log/containers`` link at it (replaced atomically: a shipper following the link
    sees the old file or the new one)."""
    os.makedirs(spec.directory, mode=0o755, exist_ok=True)
    path = spec.log_path(restart)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    link = spec.link_path(container_id)
    if link is not None:
        os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
        tmp = f"{link}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)
    return fd


def remove_logs(spec: CriLogSpec, container_id: str) -> None:
    """What the kubelet removes with a container: its log directory and its link; the pod's
    directory too once no container of it has logs left."""
    link = spec.link_path(container_id)
    if link is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(spec.directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(spec.directory, name))
    for d in (spec.directory, os.path.dirname(spec.directory)):
        with contextlib.suppress(OSError):  # not empty (another container's), or gone
            os.rmdir(d)
