"""The Runtime conformance suite: named checks every :class:`~tidal.engine.runtime.Runtime`
must pass, run against runc, crun, runsc and :class:`~tidal.testing.engine.FakeRuntime` alike
(as containerd's ``SnapshotterSuite`` runs against every snapshotter). Where a runtime
genuinely differs (runsc has no ``update``; it finds a missing executable at ``start``), the
check follows the runtime's declared :class:`~tidal.engine.runtime.RuntimeCapabilities`, so a
wrong declaration fails here as surely as a broken verb.

A check is a function of a :class:`RuntimeHarness`, which holds the runtime under test and
writes bundles for it. Commands are limited to what both a busybox rootfs and the host have
(``sh``, ``echo``, ``sleep``, ``cat``, ``true``), so the fake (host processes) and the real
runtimes (the busybox tree) run the same argv. Use :data:`CHECKS` with pytest's parametrize.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tidal.engine.bundle import BundleInputs, build_config, write_bundle
from tidal.engine.runtime import Runtime, open_runtime
from tidal.engine.spec import ContainerSpec
from tidal.errors import ContainerNotFoundError, OciRuntimeError, TidalError

WAIT_S = 10.0


@dataclass
class RuntimeHarness:
    """The runtime under test, a rootfs for its bundles, and a place for logs."""

    runtime: Runtime
    rootfs: Path
    work: Path
    cgroup_parent: str = "tidal-conformance"
    made: list[str] = field(default_factory=list)

    def bundle(self, cid: str, args: tuple[str, ...]) -> Path:
        spec = ContainerSpec(image=str(self.rootfs), command=args)
        cfg = build_config(
            spec,
            BundleInputs(
                container_id=cid,
                rootfs=str(self.rootfs),
                args=args,
                cgroups_path=f"/{self.cgroup_parent}/{cid}",
                nofile_limit=1024,
            ),
        )
        cfg["root"]["readonly"] = True
        path = self.work / "bundles" / cid
        write_bundle(path, cfg)
        return path

    def create(self, *args: str) -> str:
        """Create a container running ``args``; returns its id (deleted by :meth:`cleanup`)."""
        return self._make(self.runtime.create, args)

    def run_detached(self, *args: str) -> str:
        """Create and start in one call (:meth:`Runtime.run_detached`); returns the id."""
        return self._make(self.runtime.run_detached, args)

    def _make(self, step: Callable[..., None], args: tuple[str, ...]) -> str:
        cid = f"conf-{uuid.uuid4().hex[:12]}"
        self.made.append(cid)
        fd = os.open(self.log_path(cid), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            step(
                cid,
                self.bundle(cid, args),
                pid_file=self.work / f"{cid}.pid",
                log_path=self.work / f"{cid}.runtime.log",
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        return cid

    def log_path(self, cid: str) -> Path:
        return self.work / f"{cid}.log"

    def wait_status(self, cid: str, status: str, timeout_s: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.runtime.state(cid)
            got = st.status if st else "unknown"
            if got == status or time.monotonic() > deadline:
                return got
            time.sleep(0.01)

    def wait_output(self, cid: str, timeout_s: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = self.log_path(cid).read_bytes()
            if data.endswith(b"\n"):
                return data
            time.sleep(0.01)
        return self.log_path(cid).read_bytes()

    def cleanup(self) -> list[str]:
        """Force-delete every container this harness made; returns ids still known after."""
        for cid in self.made:
            with suppress(TidalError):
                self.runtime.delete(cid, force=True)
        return [cid for cid in self.made if self.runtime.state(cid) is not None]


@contextmanager
def expect(exc: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except exc:
        return
    raise AssertionError(f"expected {exc.__name__}")


# --- the checks ----------------------------------------------------------------------------


def check_create_leaves_a_waiting_init(h: RuntimeHarness) -> None:
    cid = h.create("echo", "ran")
    st = h.runtime.state(cid)
    assert st is not None and st.status == "created", st
    assert st.pid > 0 and int((h.work / f"{cid}.pid").read_text()) == st.pid
    assert cid in h.runtime.list_ids()
    time.sleep(0.1)
    assert h.log_path(cid).read_bytes() == b"", "the process ran before start"


def check_start_runs_the_process(h: RuntimeHarness) -> None:
    cid = h.create("sh", "-c", "echo started; sleep 30")
    h.runtime.start(cid)
    assert h.wait_status(cid, "running") == "running"
    assert h.wait_output(cid) == b"started\n"


def check_exit_makes_it_stopped(h: RuntimeHarness) -> None:
    cid = h.create("true")
    h.runtime.start(cid)
    assert h.wait_status(cid, "stopped") == "stopped"
    h.runtime.delete(cid)
    assert h.runtime.state(cid) is None


def check_start_twice_is_refused(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    h.runtime.start(cid)
    with expect(OciRuntimeError):
        h.runtime.start(cid)


def check_duplicate_id_is_refused(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with expect(OciRuntimeError):
            h.runtime.create(
                cid,
                h.bundle(cid, ("sleep", "30")),
                pid_file=h.work / "dup.pid",
                log_path=h.work / "dup.runtime.log",
                stdout=fd,
                stderr=fd,
            )
    finally:
        os.close(fd)
    assert h.runtime.state(cid) is not None  # the first one is untouched


def check_missing_executable_fails_create(h: RuntimeHarness) -> None:
    if h.runtime.capabilities.create_checks_executable:
        with expect(OciRuntimeError):
            h.create("/no/such/binary")
        return
    cid = h.create("/no/such/binary")  # the sandbox is built; the exec happens at start
    with expect(OciRuntimeError):
        h.runtime.start(cid)


def check_run_detached_runs_the_process(h: RuntimeHarness) -> None:
    """Create and start in one call: the process runs, its pid is in the pid file, and its
    init is not the caller's child (the monitor is its subreaper)."""
    cid = h.run_detached("sh", "-c", "echo in-one-step; sleep 30")
    assert h.wait_output(cid) == b"in-one-step\n"
    st = h.runtime.state(cid)
    assert st is not None and st.status == "running", st
    assert int((h.work / f"{cid}.pid").read_text()) == st.pid
    with open(f"/proc/{st.pid}/stat") as fh:
        assert int(fh.read().rsplit(")", 1)[1].split()[1]) != os.getpid()
    h.runtime.kill(cid, "KILL")
    assert h.wait_status(cid, "stopped") == "stopped"


def check_run_detached_of_a_missing_executable_fails(h: RuntimeHarness) -> None:
    """A process that cannot run is an error of the call, whichever step finds out."""
    with expect(OciRuntimeError):
        h.run_detached("/no/such/binary")
    cid = h.made[-1]
    h.runtime.delete(cid, force=True)
    assert h.runtime.state(cid) is None


def check_kill_delivers_the_signal(h: RuntimeHarness) -> None:
    # A container's PID 1 ignores signals it has no handler for, so the init traps TERM.
    cid = h.create(
        "sh", "-c", "trap 'echo got-term; exit 0' TERM; echo up; while :; do sleep 0.05; done"
    )
    h.runtime.start(cid)
    assert h.wait_output(cid) == b"up\n"
    h.runtime.kill(cid, "TERM")
    assert h.wait_status(cid, "stopped") == "stopped"
    assert h.log_path(cid).read_bytes() == b"up\ngot-term\n"


def check_kill_all_reaches_every_process(h: RuntimeHarness) -> None:
    cid = h.create("sh", "-c", "trap '' TERM; sleep 30 & sleep 30")
    h.runtime.start(cid)
    assert h.wait_status(cid, "running") == "running"
    h.runtime.kill(cid, "KILL", all_processes=True)
    assert h.wait_status(cid, "stopped") == "stopped"


def check_delete_refuses_running_unless_forced(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    h.runtime.start(cid)
    with expect(OciRuntimeError):
        h.runtime.delete(cid)
    assert h.runtime.state(cid) is not None
    h.runtime.delete(cid, force=True)
    assert h.runtime.state(cid) is None
    assert cid not in h.runtime.list_ids()


def check_delete_of_created_container(h: RuntimeHarness) -> None:
    cid = h.create("echo", "never")
    h.runtime.delete(cid, force=True)
    assert h.runtime.state(cid) is None
    assert h.log_path(cid).read_bytes() == b""


def check_unknown_ids(h: RuntimeHarness) -> None:
    cid = f"conf-unknown-{uuid.uuid4().hex[:8]}"
    assert h.runtime.state(cid) is None
    h.runtime.delete(cid)  # not an error
    h.runtime.delete(cid, force=True)
    with expect(ContainerNotFoundError):
        h.runtime.kill(cid, "TERM")
    with expect(ContainerNotFoundError):
        h.runtime.update(cid, {"pids": {"limit": 100}})


def check_exec_runs_inside_with_env(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    h.runtime.start(cid)
    res = h.runtime.exec(cid, ["sh", "-c", "echo $X; echo err >&2; exit 3"], env=["X=42"])
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"42\n", b"err\n"), res
    res = h.runtime.exec(cid, ["cat"], stdin=b"piped")
    assert res.stdout == b"piped"
    res = h.runtime.exec(cid, ["sh", "-c", "echo $PATH"])  # the container's own env stays
    assert res.exit_code == 0 and b"/bin" in res.stdout, res


def check_update_of_a_running_container(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    h.runtime.start(cid)
    if not h.runtime.capabilities.update:
        with expect(OciRuntimeError):
            h.runtime.update(cid, {"memory": {"limit": 64 << 20}})
        assert h.wait_status(cid, "running") == "running"  # the refusal left it alone
        return
    h.runtime.update(cid, {"memory": {"limit": 64 << 20}})
    if h.runtime.capabilities.update_pids:
        h.runtime.update(cid, {"pids": {"limit": 100}})


def check_ref_rebuilds_the_same_driver(h: RuntimeHarness) -> None:
    cid = h.create("sleep", "30")
    other = open_runtime(h.runtime.ref())
    assert type(other) is type(h.runtime) and other.root == h.runtime.root
    st = other.state(cid)
    assert st is not None and st.status == "created"
    other.start(cid)
    assert h.wait_status(cid, "running") == "running"


def check_init_is_reparented_away_from_the_caller(h: RuntimeHarness) -> None:
    """The init must not stay the caller's child (the monitor relies on being its subreaper)."""
    cid = h.create("sleep", "30")
    st = h.runtime.state(cid)
    assert st is not None
    with open(f"/proc/{st.pid}/stat") as fh:
        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()


def check_pod_annotations_follow_the_capability(h: RuntimeHarness) -> None:
    """One sandbox kernel per pod (runsc) needs annotations; shared namespaces need none."""
    sandbox = h.runtime.pod_annotations("pod-1", is_sandbox=True)
    member = h.runtime.pod_annotations("pod-1", is_sandbox=False)
    if not h.runtime.capabilities.pod_sandbox:
        assert sandbox == {} and member == {}, (sandbox, member)
        return
    assert sandbox != member and "pod-1" in sandbox.values() and "pod-1" in member.values()


CHECKS: tuple[Callable[[RuntimeHarness], None], ...] = (
    check_create_leaves_a_waiting_init,
    check_start_runs_the_process,
    check_exit_makes_it_stopped,
    check_start_twice_is_refused,
    check_duplicate_id_is_refused,
    check_missing_executable_fails_create,
    check_run_detached_runs_the_process,
    check_run_detached_of_a_missing_executable_fails,
    check_kill_delivers_the_signal,
    check_kill_all_reaches_every_process,
    check_delete_refuses_running_unless_forced,
    check_delete_of_created_container,
    check_unknown_ids,
    check_exec_runs_inside_with_env,
    check_update_of_a_running_container,
    check_ref_rebuilds_the_same_driver,
    check_init_is_reparented_away_from_the_caller,
    check_pod_annotations_follow_the_capability,
)
