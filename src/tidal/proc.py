"""Run an external tool: the one place that starts a child process and turns its failure
into a Tidal error (an import-linter contract keeps every other module to subprocess's
constants and types).

Tidal drives many tools (losetup, mkfs.ext4, mount, ip, tc, runc, the registry binary). Each
call wants the same three things: a timeout, so a hung tool cannot hang a daemon; its failure
translated into the caller's error class with the tool's own words (the last lines of its
stderr); and a debug log line with what ran and how long it took. Best-effort cleanup
(``check=False`` via :func:`run_logged`) logs failures instead of hiding them.

Long-lived children (a FUSE server, the watchdog, a registry, a recorded command whose output
is read as it comes) cannot be :func:`run` to completion; :func:`spawn` starts them with the
same translation of a missing or unstartable binary.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tidal.errors import TidalError, ToolError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
"""Longer than any tool Tidal drives needs on a loaded 2-core node (mkfs of a few GB: ~5 s)."""

Stream = int | IO[Any] | None


def tool_message(stderr: str | bytes | None, stdout: str | bytes | None, returncode: int) -> str:
    """The last lines a tool wrote on stderr (else stdout), joined into one line."""

    def text(b: str | bytes | None) -> str:
        if b is None:
            return ""
        return b.decode(errors="replace") if isinstance(b, bytes) else b

    lines = [ln.strip() for ln in (text(stderr).strip() or text(stdout).strip()).splitlines()]
    lines = [ln for ln in lines if ln]
    return "; ".join(lines[-3:]) or f"exit status {returncode}"


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    error: type[TidalError] = ToolError,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    input: str | bytes | None = None,
    text: bool = True,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: Stream = None,
    stdout: Stream = subprocess.PIPE,
    stderr: Stream = subprocess.PIPE,
    install_hint: str | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` and return the completed process.

    ``what`` says what the call is for ("attaching /srv/img to a loop device"); it starts every
    error message. A missing binary, a timeout and (with ``check``) a non-zero exit raise
    ``error``. ``install_hint`` names the package to install when the binary is missing.
    """
    args = [str(a) for a in argv]
    started = time.monotonic()
    if input is not None and not text and isinstance(input, str):
        input = input.encode()
    try:
        proc = _run_to_end(
            args,
            input,
            timeout_s,
            stdin=stdin if input is None else subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            text=text,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError:
        hint = f" ({install_hint})" if install_hint else ""
        raise error(f"{what}: {args[0]} is not installed{hint}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {args[0]} did not finish within {timeout_s:.0f} s") from None
    except OSError as exc:
        raise error(f"{what}: cannot run {args[0]}: {exc.strerror or exc}") from exc
    log.debug(
        "ran %s (%s) in %.3f s: exit %d",
        " ".join(args),
        what,
        time.monotonic() - started,
        proc.returncode,
    )
    if check and proc.returncode != 0:
        raise error(f"{what}: {tool_message(proc.stderr, proc.stdout, proc.returncode)}")
    return proc


def _run_to_end(
    args: list[str], input: str | bytes | None, timeout_s: float, **popen: Any
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(..., timeout=)`` without its polling wait.

    With a timeout, ``Popen.wait`` polls ``waitpid`` with sleeps doubling from 1 ms to 50 ms,
    so a tool that ends after 41 ms is seen to end at 63 ms (``runc create`` on the start
    path: measured 66 ms against runc's own 41). A child whose stdio is not piped to us (the
    runtime's ``create`` writes to the container's log) is instead waited for on a pidfd,
    readable the moment it exits. With pipes, ``communicate`` waits on them; by their EOF
    the child has (all but) exited, so its wait returns at once."""
    with subprocess.Popen(args, **popen) as child:
        try:
            if child.stdin is None and child.stdout is None and child.stderr is None:
                _wait_exited(child, timeout_s)
                out = err = None
            else:
                out, err = child.communicate(input, timeout=timeout_s)
        except BaseException:
            child.kill()
            child.wait()
            raise
        return subprocess.CompletedProcess(args, child.wait(), out, err)


def _wait_exited(child: subprocess.Popen[Any], timeout_s: float) -> None:
    """Block until ``child`` exits (not reaped: ``wait`` then reaps it), or raise
    ``TimeoutExpired``; a pidfd where the kernel has them, else ``Popen``'s polling wait."""
    try:
        fd = os.pidfd_open(child.pid)
    except OSError:  # reaped already, or a kernel without pidfds
        child.wait(timeout_s)
        return
    try:
        poller = select.poll()  # not select(): a daemon's fds may be numbered past 1024
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(child.args, timeout_s)
    finally:
        os.close(fd)


def spawn(
    argv: Sequence[str | Path],
    *,
    what: str,
    error: type[TidalError] = ToolError,
    install_hint: str | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a long-lived child (``popen`` goes to :class:`subprocess.Popen`).

    The caller owns the child (waits for it, reads its pipes). A missing binary or an OS
    refusal to start it raises ``error`` naming ``what``, as :func:`run` does.
    """
    args = [str(a) for a in argv]
    try:
        child: subprocess.Popen[bytes] = subprocess.Popen(args, **popen)
    except FileNotFoundError:
        hint = f" ({install_hint})" if install_hint else ""
        raise error(f"{what}: {args[0]} is not installed{hint}") from None
    except OSError as exc:
        raise error(f"{what}: cannot run {args[0]}: {exc.strerror or exc}") from exc
    log.debug("started %s (%s): pid %d", " ".join(args), what, child.pid)
    return child


def run_logged(argv: Sequence[str | Path], *, what: str, timeout_s: float = 60.0) -> bool:
    """Best-effort cleanup: run ``argv``; on any failure log a warning naming it, return False.

    For teardown paths (delete a veth, unmount lazily) where the caller goes on either way but
    an operator must be able to see what was left behind.
    """
    try:
        run(argv, what=what, timeout_s=timeout_s)
    except TidalError as exc:
        log.warning("%s", exc)
        return False
    return True
