"""The fd store: a holder process keeps fds alive across the death of whoever gave them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidal.blockdev.fdstore import FdStore
from tidal.errors import FdStoreError


@pytest.fixture
def store() -> Iterator[FdStore]:
    """A holder of this test's own, on a short socket path (unix sockets allow 108 bytes),
    killed by its pid afterwards."""
    work = Path(tempfile.mkdtemp(prefix="fds-", dir="/tmp"))
    s = FdStore.ensure(work / "fds.sock")
    pid = s.holder_pid()
    try:
        yield s
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def _pipe_carries(write_fd: int, read_fd: int, payload: bytes) -> bool:
    os.write(write_fd, payload)
    return os.read(read_fd, len(payload)) == payload


def test_put_get_drop_names(store: FdStore) -> None:
    r, w = os.pipe()
    try:
        store.put("disk-a", w, meta={"minor": 45})
        os.close(w)  # the store holds its own copy now
        assert store.names() == ["disk-a"]
        got = store.get("disk-a")
        assert got is not None
        assert _pipe_carries(got, r, b"through the dup")
        os.close(got)
        entry = store.entry("disk-a")
        assert entry is not None and entry.meta == {"minor": 45} and len(entry.fds) == 1
        entry.close()
        assert store.get("nothing") is None
        store.drop("disk-a")
        assert store.names() == []
        assert os.read(r, 10) == b"", "the last write end was the store's: dropped means closed"
    finally:
        os.close(r)


def test_put_replaces_and_closes_what_was_held(store: FdStore) -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        store.put("x", w1)
        os.close(w1)
        store.put("x", w2, extra_fds=[w2])
        os.close(w2)
        assert os.read(r1, 10) == b"", "the replaced entry's fd was closed"
        entry = store.entry("x")
        assert entry is not None and len(entry.fds) == 2
        assert _pipe_carries(entry.fds[1], r2, b"second")
        entry.close()
    finally:
        store.drop("x")
        os.close(r1)
        os.close(r2)


def test_fds_outlive_the_process_that_gave_them(store: FdStore) -> None:
    r, w = os.pipe()
    giver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; from tidal.blockdev.fdstore import FdStore;"
            f"FdStore({str(store.socket_path)!r}).put('held', {w});"
            "print('put', flush=True); time.sleep(60)",
        ],
        pass_fds=(w,),
        stdout=subprocess.PIPE,
    )
    os.close(w)
    try:
        assert giver.stdout is not None and giver.stdout.readline() == b"put\n"
        giver.kill()
        giver.wait(10)
        got = store.get("held")
        assert got is not None
        assert _pipe_carries(got, r, b"alive after SIGKILL")
        os.close(got)
    finally:
        giver.kill()
        giver.wait(10)
        if giver.stdout is not None:
            giver.stdout.close()
        store.drop("held")
        os.close(r)


def test_ensure_reuses_a_running_holder_and_a_second_holder_steps_aside(store: FdStore) -> None:
    pid = store.holder_pid()
    assert FdStore.ensure(store.socket_path).holder_pid() == pid
    second = subprocess.run(
        [sys.executable, "-m", "tidal.blockdev.fdstore", str(store.socket_path)],
        capture_output=True,
        timeout=30,
    )
    assert second.returncode == 0 and b"another holder" in second.stderr
    assert store.holder_pid() == pid


def test_bad_requests_are_one_clear_error(store: FdStore) -> None:
    with pytest.raises(FdStoreError, match="unknown request 'steal'"):
        store._call({"op": "steal", "name": "x"})
    with pytest.raises(FdStoreError, match="needs a non-empty name"):
        store._call({"op": "get"})
    with pytest.raises(FdStoreError, match="came without a file descriptor"):
        store._call({"op": "put", "name": "x"})
    with pytest.raises(FdStoreError, match="did not answer 'names'"):
        FdStore(store.socket_path.with_name("nobody.sock")).names()


@pytest.mark.root
def test_callers_of_another_uid_are_refused(store: FdStore) -> None:
    os.chmod(store.socket_path.parent, 0o755)
    os.chmod(store.socket_path, 0o777)  # past the file mode: SO_PEERCRED must refuse
    code = (
        "import os; from tidal.blockdev.fdstore import FdStore;"
        "os.setgid(65534); os.setuid(65534);"
        f"FdStore({str(store.socket_path)!r}).names()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.returncode != 0
    assert b"only root or the holder's own uid" in out.stderr


def test_holder_is_started_detached_and_answers_fast(store: FdStore) -> None:
    t0 = time.monotonic()
    for _ in range(20):
        store.names()
    assert (time.monotonic() - t0) / 20 < 0.05
    pid = store.holder_pid()
    assert os.getsid(pid) != os.getsid(0), "the holder has its own session: it outlives us"
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != os.getpid()


@pytest.mark.root
def test_the_holder_asks_the_oom_killer_to_spare_it_or_says_why_not(store: FdStore) -> None:
    adj = Path(f"/proc/{store.holder_pid()}/oom_score_adj").read_text().strip()
    log = store.socket_path.with_name(store.socket_path.name + ".log").read_text()
    # this machine's sandbox answers EIO even to root: then the holder's log says so
    assert adj == "-1000" or "the OOM killer may pick this holder" in log, (adj, log)
