"""Pod-level limits on the host: the pod's cgroup, traffic control on its veth, block I/O.

Pure builders first (what to write where, which ``tc`` lines to run), then thin adapters that
write cgroupfs files and run ``tc`` through :func:`tidal.proc.run`.

- CPU, memory, pids: the pod's cgroup (``/<engine cgroup parent>/pod-<id12>``) in the v1
  ``cpu``, ``memory`` and ``pids`` hierarchies (or the v2 unified one); every container of the
  pod is a child of it, so the kernel enforces the sum.
- Bandwidth: ``tbf`` on both ends of the sandbox's veth pair. Traffic *into* the instance is
  shaped on the host end's egress; traffic *out of* it on the instance end (``eth0`` in the
  pod's network namespace, set from the host with ``tc -n``), because this kernel has neither
  ``ifb`` nor the ``police`` action to shape a device's ingress. Containers get no
  ``CAP_NET_ADMIN`` (rich mode excepted), so they cannot lift it.
- Packets per second: a ``u32`` filter with a ``police pkts_rate`` action, where the kernel has
  the action (``act_police``); where it has not, the limit is recorded as not enforced with
  the kernel's words and shown by ``inspect`` (never silently dropped).
- Disk: v1 ``blkio.throttle.*_device`` (v2 ``io.max``) on the pod's cgroup, for each block
  device the pod's containers use (their quota volumes' loop devices, the image's, the disk
  holding the state directory). v1's blk-throttle is not hierarchical, so there each member's
  processes are moved into the pod's blkio cgroup once started (one shared budget) and the
  same limits are written on the member's own cgroup for what ``exec`` starts there.
  Throttling counts direct and synchronous I/O; v1 charges buffered writeback to the flusher.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tidal import proc
from tidal.cgroups import CGROUP_ROOT
from tidal.engine.network import in_netns
from tidal.errors import LimitError
from tidal.instance.spec import Limits

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
TBF_LATENCY_MS = 50
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
"""Hierarchies the pod's cgroup is made in before its containers (runc makes the rest)."""
V1_ALL = (
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "hugetlb",
    "systemd",
    "unified",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
)
"""Every hierarchy a runtime may have placed the pod's children in (all emptied at removal)."""


# --- pure builders ----------------------------------------------------------------------------


def cgroup_files(limits: Limits, *, v2: bool) -> list[tuple[str, str, str]]:
    """(controller, file, value) for CPU, memory and pids; controller is "" on v2."""
    out: list[tuple[str, str, str]] = []
    if limits.cpus is not None:
        quota = round(limits.cpus * CPU_PERIOD_US)
        if v2:
            out.append(("", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
        else:
            out.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
            out.append(("cpu", "cpu.cfs_quota_us", str(quota)))
            out.append(("cpu", "cpu.shares", str(max(2, round(limits.cpus * 1024)))))
    if limits.memory_bytes is not None:
        if v2:
            out.append(("", "memory.max", str(limits.memory_bytes)))
        else:
            out.append(("memory", "memory.limit_in_bytes", str(limits.memory_bytes)))
    if limits.pids is not None:
        out.append(("" if v2 else "pids", "pids.max", str(limits.pids)))
    return out


def blkio_lines(
    limits: Limits, devices: Iterable[tuple[int, int]], *, v2: bool
) -> list[tuple[str, str]]:
    """(file, line) per device: v1 ``blkio.throttle.*_device`` or v2 ``io.max``."""
    pairs = (
        ("read_bps", limits.disk_read_bps, "rbps"),
        ("write_bps", limits.disk_write_bps, "wbps"),
        ("read_iops", limits.disk_read_iops, "riops"),
        ("write_iops", limits.disk_write_iops, "wiops"),
    )
    out: list[tuple[str, str]] = []
    for major, minor in sorted(set(devices)):
        if v2:
            keys = " ".join(f"{k2}={v}" for _, v, k2 in pairs if v is not None)
            if keys:
                out.append(("io.max", f"{major}:{minor} {keys}"))
            continue
        for k1, v, _ in pairs:
            if v is not None:
                out.append((f"blkio.throttle.{k1}_device", f"{major}:{minor} {v}"))
    return out


def tbf_burst_bytes(rate_bps: int) -> int:
    """Bucket size: 20 ms of the rate, at least 16 KiB (tbf needs burst >= rate / HZ)."""
    return max(rate_bps // 8 // 50, 16 * 1024)


def tbf_line(dev: str, rate_bps: int) -> str:
    """``tc -batch`` line shaping ``dev``'s egress to ``rate_bps`` bits per second."""
    return (
        f"qdisc replace dev {dev} root tbf rate {rate_bps}bit "
        f"burst {tbf_burst_bytes(rate_bps)} latency {TBF_LATENCY_MS}ms"
    )


def pps_lines(dev: str, pps: int, *, ingress: bool) -> list[str]:
    """Police ``dev``'s packets per second (``ingress``: what arrives on it) with clsact + u32."""
    direction = "ingress" if ingress else "egress"
    return [
        f"qdisc replace dev {dev} clsact",
        f"filter replace dev {dev} {direction} prio 1 protocol all u32 match u32 0 0 "
        f"action police pkts_rate {pps} pkts_burst {max(pps // 10, 10)} drop",
    ]


@dataclass(frozen=True)
class NetPlan:
    """tc lines for the host end and for the instance end (run in the pod's netns)."""

    host: tuple[str, ...]
    pod: tuple[str, ...]
    host_pps: tuple[str, ...]
    pod_pps: tuple[str, ...]


def net_plan(limits: Limits, host_dev: str, pod_dev: str = "eth0") -> NetPlan:
    """Ingress (into the pod) leaves through the host end; egress leaves through ``eth0``."""
    host = (tbf_line(host_dev, limits.ingress_bps),) if limits.ingress_bps else ()
    pod = (tbf_line(pod_dev, limits.egress_bps),) if limits.egress_bps else ()
    host_pps = (
        tuple(pps_lines(host_dev, limits.ingress_pps, ingress=False)) if limits.ingress_pps else ()
    )
    pod_pps = (
        tuple(pps_lines(pod_dev, limits.egress_pps, ingress=False)) if limits.egress_pps else ()
    )
    return NetPlan(host, pod, host_pps, pod_pps)


# --- host adapters ----------------------------------------------------------------------------


def _tc_batch(lines: Iterable[str], what: str, netns: str | None = None) -> None:
    text = "".join(line + "\n" for line in lines)
    if not text:
        return
    argv = [*(in_netns(netns) if netns else []), "tc", "-batch", "-"]
    proc.run(argv, what=what, error=LimitError, timeout_s=30, input=text)


def apply_net(limits: Limits, host_dev: str, netns: str) -> list[str]:
    """Shape the pod's veth (``netns``: the path of the pod's network namespace); returns the
    limits the kernel could not enforce, with why."""
    plan = net_plan(limits, host_dev)
    _tc_batch(plan.host, f"shaping traffic into the instance on {host_dev}")
    _tc_batch(plan.pod, f"shaping traffic out of the instance (eth0 in {netns})", netns)
    unenforced = []
    for lines, netns_, name in (
        (plan.host_pps, None, "ingress_pps"),
        (plan.pod_pps, netns, "egress_pps"),
    ):
        try:
            _tc_batch(lines, f"policing {name}", netns_)
        except LimitError as exc:
            # this kernel may lack act_police; say so rather than pretend
            why = str(exc).split(";")[0].removeprefix(f"policing {name}: ")
            unenforced.append(f"{name}: the kernel refused the tc police action ({why})")
    return unenforced


def block_device_of(path: Path) -> tuple[int, int] | None:
    """The whole-disk block device holding ``path`` (a partition maps to its disk), if any."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # overlay, tmpfs, FUSE: no block device
    sysdir = Path(f"/sys/dev/block/{major}:{minor}")
    if not sysdir.exists():
        return None
    if (sysdir / "partition").exists():
        with contextlib.suppress(OSError, ValueError):
            major_s, minor_s = (sysdir.resolve().parent / "dev").read_text().strip().split(":")
            return int(major_s), int(minor_s)
    return major, minor


class PodCgroup:
    """The pod's cgroup in every hierarchy: made before its containers, removed after them."""

    def __init__(self, path: str, root: Path = CGROUP_ROOT) -> None:
        self.path = path.strip("/")
        self.root = root
        self.v2 = (root / "cgroup.controllers").exists()

    def _dir(self, controller: str) -> Path:
        return self.root / controller / self.path if controller else self.root / self.path

    def _write(self, controller: str, name: str, value: str) -> None:
        target = self._dir(controller) / name
        try:
            target.write_text(value)
        except OSError as exc:
            raise LimitError(
                f"writing {value!r} to {target} failed: {exc.strerror or exc}"
            ) from exc

    def create(self, limits: Limits) -> None:
        if self.v2:
            self._dir("").mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # enable controllers for the children
                (self._dir("") / "cgroup.subtree_control").write_text("+cpu +memory +pids +io")
        else:
            for ctrl in V1_CONTROLLERS:
                if (self.root / ctrl).is_dir():
                    self._dir(ctrl).mkdir(parents=True, exist_ok=True)
        for ctrl, name, value in cgroup_files(limits, v2=self.v2):
            self._write(ctrl, name, value)

    def limit_devices(
        self, limits: Limits, devices: Iterable[tuple[int, int]], child: str | None = None
    ) -> None:
        """Throttle ``devices`` for the pod (or for its ``child`` container's own cgroup)."""
        ctrl = "" if self.v2 else "blkio"
        for name, line in blkio_lines(limits, devices, v2=self.v2):
            self._write(ctrl, f"{child}/{name}" if child else name, line)

    def make_child(self, child: str) -> None:
        """A member's blkio (v2: unified) cgroup, before its runtime creates the container."""
        d = self._dir("" if self.v2 else "blkio") / child
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LimitError(f"creating cgroup {d} failed: {exc.strerror or exc}") from exc

    def make_empty_child(self, child: str) -> None:
        """A child cgroup in every hierarchy the pod has, for a container that will hold no
        process (a runc pod's sandbox): what a runtime would have made for it, empty."""
        for d in self.dirs():
            try:
                (d / child).mkdir(exist_ok=True)
            except OSError as exc:
                raise LimitError(
                    f"creating cgroup {d / child} failed: {exc.strerror or exc}"
                ) from exc

    def adopt_blkio(self, child: str, passes: int = 5) -> int:
        """cgroup v1 only: move a member's processes into the pod's own blkio cgroup.

        v1's blk-throttle is not hierarchical (a parent's limit does not cover its
        children's I/O unless the kernel's development-only ``sane_behavior`` is on), so the
        pod's members share one budget only by sitting in the pod's blkio cgroup itself;
        their children follow them. Processes ``runc exec`` places in the member's own
        cgroup later are held by the same limits written there (:meth:`limit_devices`).
        Returns how many processes were moved."""
        if self.v2:
            return 0
        src = self._dir("blkio") / child / "cgroup.procs"
        dst = self._dir("blkio") / "cgroup.procs"
        moved = 0
        for _ in range(passes):  # a process may fork while we move its parent
            try:
                pids = src.read_text().split()
            except OSError as exc:
                raise LimitError(f"reading {src} failed: {exc.strerror or exc}") from exc
            if not pids:
                break
            for pid in pids:
                try:
                    dst.write_text(pid)
                    moved += 1
                except ProcessLookupError:
                    continue  # exited meanwhile
                except OSError as exc:
                    raise LimitError(
                        f"moving pid {pid} into {dst} failed: {exc.strerror or exc}"
                    ) from exc
        return moved

    def read(self, controller: str, name: str) -> str:
        return (self._dir(controller) / name).read_text().strip()

    def dirs(self) -> list[Path]:
        if self.v2:
            return [self._dir("")] if self._dir("").exists() else []
        return [self._dir(c) for c in V1_ALL if self._dir(c).is_dir()]

    def remove_children(self, keep: str) -> None:
        """Remove every child cgroup but ``keep``'s (a reused pod keeps its sandbox's)."""
        for d in self.dirs():
            for child in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                if child.relative_to(d).parts[0] == keep:
                    continue
                with contextlib.suppress(OSError):
                    child.rmdir()

    def processes(self, exclude_child: str) -> list[int]:
        """Pids in the pod cgroup and its children, except those in ``exclude_child``."""
        pids: set[int] = set()
        for d in self.dirs():
            for procs in d.rglob("cgroup.procs"):
                if procs.parent != d and procs.relative_to(d).parts[0] == exclude_child:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    pids |= {int(x) for x in procs.read_text().split()}
        return sorted(pids)

    def remove(self) -> None:
        """Remove the (empty) pod cgroup everywhere; children a runtime left go first."""
        failed = []
        for d in self.dirs():
            for child in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(f"{d}: {exc.strerror or exc}")
        if failed:
            raise LimitError(f"the pod cgroup could not be removed: {'; '.join(failed)}")
