"""One interface over cgroup v1 and v2: the cgroupfs access layer shared by the engine and the QoS agent.

A cgroup is named by its path below the hierarchy root (``"tidal/web"``), the same on both
versions; v1 keeps one directory per controller (cpu, cpuacct, memory), v2 one directory.
Values cross this boundary in one vocabulary (:class:`CpuLimits`, :class:`CpuStats`,
:class:`MemoryStats`, :class:`Pressure`), v1 shares and v2 weights alike, so policies never
know which version they run on. Everything else (policies, executor logic) is tested against
the same classes pointed at a fake tree under ``tmp_path`` (:mod:`tidal.testing.cgroups`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from tidal.errors import CgroupError, CgroupNotFoundError

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the kernel's cgroup hierarchies are mounted (v2: the unified root; v1: one per controller)."""
V1_UNLIMITED_MEMORY = 9223372036854771712
"""What v1 reports as ``memory.limit_in_bytes`` when there is no limit (PAGE_COUNTER_MAX)."""
DEFAULT_PERIOD_US = 100_000
DEFAULT_SHARES = 1024
"""The kernel's nice-0 load weight; v2's default weight 100 corresponds to it."""
MIN_SHARES = 2


@dataclass(frozen=True)
class CpuLimits:
    """The CPU knobs the agent owns, in v1 units (shares), mapped to v2 (weight) by the fs."""

    quota_us: int | None = None
    """CFS quota per period; ``None`` means unlimited."""
    period_us: int = DEFAULT_PERIOD_US
    shares: int = DEFAULT_SHARES
    burst_us: int = 0
    idle: bool = False
    """SCHED_IDLE for the whole group: runs only when nothing else wants the CPU."""

    @property
    def quota_cores(self) -> float | None:
        return None if self.quota_us is None else self.quota_us / self.period_us

    @staticmethod
    def from_cores(cores: float | None, **kw: object) -> CpuLimits:
        period = int(kw.pop("period_us", DEFAULT_PERIOD_US))  # type: ignore[call-overload]
        quota = None if cores is None else max(1000, round(cores * period))
        return CpuLimits(quota_us=quota, period_us=period, **kw)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {
            "quota_us": self.quota_us,
            "period_us": self.period_us,
            "shares": self.shares,
            "burst_us": self.burst_us,
            "idle": self.idle,
        }

    @staticmethod
    def from_dict(d: dict[str, object]) -> CpuLimits:
        q = d.get("quota_us")
        return CpuLimits(
            quota_us=None if q is None else int(q),  # type: ignore[call-overload]
            period_us=int(d.get("period_us", DEFAULT_PERIOD_US)),  # type: ignore[call-overload]
            shares=int(d.get("shares", DEFAULT_SHARES)),  # type: ignore[call-overload]
            burst_us=int(d.get("burst_us", 0)),  # type: ignore[call-overload]
            idle=bool(d.get("idle", False)),
        )


@dataclass(frozen=True)
class CpuStats:
    usage_ns: int
    nr_periods: int = 0
    nr_throttled: int = 0
    throttled_ns: int = 0


@dataclass(frozen=True)
class MemoryStats:
    usage_bytes: int
    working_set_bytes: int
    limit_bytes: int | None


@dataclass(frozen=True)
class IoStats:
    """Bytes and operations a cgroup read and wrote on one block device (``MAJ:MIN``)."""

    read_bytes: int = 0
    write_bytes: int = 0
    reads: int = 0
    writes: int = 0


@dataclass(frozen=True)
class Pressure:
    """PSI ``some avg10`` (percent of time at least one task stalled) per resource."""

    cpu_some_avg10: float | None = None
    memory_some_avg10: float | None = None
    io_some_avg10: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def shares_to_weight(shares: int) -> int:
    """v1 shares -> v2 weight, keeping the kernel's nice-0 ratio (1024 <-> 100)."""
    return max(1, min(10_000, round(shares * 100 / 1024)))


def weight_to_shares(weight: int) -> int:
    return max(MIN_SHARES, round(weight * 1024 / 100))


def parse_pressure(text: str) -> float | None:
    """The ``some avg10`` value of a PSI file, or None when absent."""
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split()[1:]:
                key, _, value = part.partition("=")
                if key == "avg10":
                    return float(value)
    return None


def _parse_kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


class CgroupFs(ABC):
    """Read and write the cgroups of one hierarchy (v1 or v2) rooted at ``root``."""

    version: int

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- file access: every failure becomes a CgroupError naming the file --------------------

    def _read(self, path: Path) -> str:
        try:
            return path.read_text()
        except FileNotFoundError:
            raise CgroupNotFoundError(
                f"cgroup file {path} does not exist; is the cgroup created and the controller mounted?"
            ) from None
        except OSError as exc:
            raise CgroupError(f"cannot read cgroup file {path}: {exc.strerror or exc}") from exc

    def _write(self, path: Path, value: str) -> None:
        try:
            with path.open("w") as fh:
                fh.write(value)
        except FileNotFoundError:
            raise CgroupNotFoundError(
                f"cgroup file {path} does not exist; is the cgroup created and the controller mounted?"
            ) from None
        except OSError as exc:
            raise CgroupError(
                f"cannot write {value!r} to cgroup file {path}: {exc.strerror or exc}"
            ) from exc

    # --- tree -----------------------------------------------------------------------------------

    @abstractmethod
    def dirs(self, cgroup: str) -> list[Path]:
        """Every directory that represents ``cgroup`` (one per controller on v1)."""

    def exists(self, cgroup: str) -> bool:
        return all(d.is_dir() for d in self.dirs(cgroup))

    def create(self, cgroup: str) -> None:
        for d in self.dirs(cgroup):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {d}: {exc.strerror or exc}") from exc
            self._populate(d)

    def _populate(self, directory: Path) -> None:  # noqa: B027 (optional hook)
        """Hook for the fake tree: the kernel fills a new cgroup directory by itself."""

    def remove(self, cgroup: str) -> None:
        """Remove the cgroup (children first); it must hold no processes."""
        for d in self.dirs(cgroup):
            if not d.is_dir():
                continue
            for child in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                self._rmdir(child)
            self._rmdir(d)

    def _rmdir(self, d: Path) -> None:
        try:
            d.rmdir()
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    f"cgroup {d} still has processes; move or stop them before removing it"
                ) from exc
            raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror or exc}") from exc

    def children(self, cgroup: str) -> list[str]:
        """Direct child cgroups of ``cgroup`` ("" is the root), as cgroup paths."""
        d = self.dirs(cgroup)[0]
        prefix = cgroup.strip("/")
        try:
            names = sorted(p.name for p in d.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CgroupError(f"cannot list cgroup {d}: {exc.strerror or exc}") from exc
        return [f"{prefix}/{n}" if prefix else n for n in names]

    def add_process(self, cgroup: str, pid: int) -> None:
        for d in self.dirs(cgroup):
            self._write(d / "cgroup.procs", str(pid))

    def pids(self, cgroup: str) -> list[int]:
        text = self._read(self.dirs(cgroup)[0] / "cgroup.procs")
        return [int(x) for x in text.split()]

    def procs_files(self, cgroup: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(cgroup)]

    # --- values ---------------------------------------------------------------------------------

    @abstractmethod
    def read_cpu(self, cgroup: str) -> CpuLimits: ...

    @abstractmethod
    def write_cpu(self, cgroup: str, limits: CpuLimits) -> None: ...

    @abstractmethod
    def cpu_stats(self, cgroup: str) -> CpuStats: ...

    @abstractmethod
    def memory_stats(self, cgroup: str) -> MemoryStats: ...

    def io_stats(self, cgroup: str) -> dict[str, IoStats]:
        """Block I/O per device ``MAJ:MIN``; empty where the hierarchy does not count it."""
        return {}

    @abstractmethod
    def write_memory_limit(self, cgroup: str, limit_bytes: int | None) -> None: ...

    @abstractmethod
    def pressure(self, cgroup: str) -> Pressure | None:
        """Per-cgroup PSI, or None when this kernel/hierarchy has none."""

    @abstractmethod
    def memory_events_file(self, cgroup: str) -> Path:
        """The file whose ``oom_kill`` line counts the cgroup's OOM kills."""

    def oom_kills(self, cgroup: str) -> int:
        """OOM kills counted by the cgroup's memory controller; 0 when it has no such count
        (no memory controller, or the cgroup is already gone)."""
        try:
            return _parse_kv(self._read(self.memory_events_file(cgroup))).get("oom_kill", 0)
        except CgroupError:
            return 0

    def normalize(self, limits: CpuLimits) -> CpuLimits:
        """What :meth:`read_cpu` returns after :meth:`write_cpu` of ``limits`` (unit rounding)."""
        return limits

    def supports_idle(self, cgroup: str) -> bool:
        return any((d / "cpu.idle").exists() for d in self.dirs(cgroup))


class CgroupV1Fs(CgroupFs):
    """Legacy hierarchies: ``<root>/cpu/<cg>``, ``<root>/cpuacct/<cg>``, ``<root>/memory/<cg>``."""

    version = 1
    CONTROLLERS = ("cpu", "cpuacct", "memory")

    def __init__(self, root: Path, controllers: tuple[str, ...] | None = None) -> None:
        super().__init__(root)
        if controllers is None:
            controllers = tuple(c for c in self.CONTROLLERS if (self.root / c).is_dir())
            if "cpu" not in controllers:
                raise CgroupError(f"no cgroup v1 cpu controller mounted at {self.root / 'cpu'}")
        self.controllers = controllers

    def _dir(self, controller: str, cgroup: str) -> Path:
        return self.root / controller / cgroup.strip("/")

    def dirs(self, cgroup: str) -> list[Path]:
        return [self._dir(c, cgroup) for c in self.controllers]

    def exists(self, cgroup: str) -> bool:
        # The cpu controller is what the agent acts on; a group missing from memory or cpuacct
        # (containers placed by hand, hybrid set-ups) is still watched, with those stats absent.
        return self._dir("cpu", cgroup).is_dir()

    def read_cpu(self, cgroup: str) -> CpuLimits:
        d = self._dir("cpu", cgroup)
        quota = int(self._read(d / "cpu.cfs_quota_us"))
        burst_file, idle_file = d / "cpu.cfs_burst_us", d / "cpu.idle"
        return CpuLimits(
            quota_us=None if quota < 0 else quota,
            period_us=int(self._read(d / "cpu.cfs_period_us")),
            shares=int(self._read(d / "cpu.shares")),
            burst_us=int(self._read(burst_file)) if burst_file.exists() else 0,
            idle=bool(int(self._read(idle_file))) if idle_file.exists() else False,
        )

    def write_cpu(self, cgroup: str, limits: CpuLimits) -> None:
        d = self._dir("cpu", cgroup)
        current = self.read_cpu(cgroup)
        if limits.period_us != current.period_us:
            # The kernel checks quota against period (and burst against quota) on every write:
            # clear quota first so that any period is accepted.
            if current.burst_us:
                self._write(d / "cpu.cfs_burst_us", "0")
            self._write(d / "cpu.cfs_quota_us", "-1")
            self._write(d / "cpu.cfs_period_us", str(limits.period_us))
        if limits.burst_us < current.burst_us:
            self._write(d / "cpu.cfs_burst_us", str(limits.burst_us))
        if limits.quota_us != current.quota_us or limits.period_us != current.period_us:
            quota = -1 if limits.quota_us is None else limits.quota_us
            self._write(d / "cpu.cfs_quota_us", str(quota))
        if limits.burst_us > current.burst_us or (
            limits.burst_us and limits.period_us != current.period_us
        ):
            self._write(d / "cpu.cfs_burst_us", str(limits.burst_us))
        if limits.shares != current.shares:
            self._write(d / "cpu.shares", str(limits.shares))
        if limits.idle != current.idle:
            if not (d / "cpu.idle").exists():
                raise CgroupError(
                    f"cgroup {cgroup}: this kernel has no cpu.idle; use shares to suppress it"
                )
            self._write(d / "cpu.idle", "1" if limits.idle else "0")

    def normalize(self, limits: CpuLimits) -> CpuLimits:
        return CpuLimits(
            limits.quota_us,
            limits.period_us,
            max(MIN_SHARES, limits.shares),
            limits.burst_us,
            limits.idle,
        )

    def cpu_stats(self, cgroup: str) -> CpuStats:
        acct = self._dir("cpuacct", cgroup) / "cpuacct.usage"
        co_mounted = self._dir("cpu", cgroup) / "cpuacct.usage"
        if "cpuacct" in self.controllers and acct.exists():
            usage = int(self._read(acct))
        elif co_mounted.exists():  # cpu,cpuacct mounted together
            usage = int(self._read(co_mounted))
        else:  # not in the cpuacct hierarchy: cpu.stat of newer kernels has usage_usec
            stat = _parse_kv(self._read(self._dir("cpu", cgroup) / "cpu.stat"))
            usage = stat.get("usage_usec", 0) * 1000
        stat = _parse_kv(self._read(self._dir("cpu", cgroup) / "cpu.stat"))
        return CpuStats(
            usage_ns=usage,
            nr_periods=stat.get("nr_periods", 0),
            nr_throttled=stat.get("nr_throttled", 0),
            throttled_ns=stat.get("throttled_time", 0),
        )

    def memory_stats(self, cgroup: str) -> MemoryStats:
        d = self._dir("memory", cgroup)
        if "memory" not in self.controllers or not d.is_dir():
            return MemoryStats(0, 0, None)
        usage = int(self._read(d / "memory.usage_in_bytes"))
        stat = _parse_kv(self._read(d / "memory.stat"))
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        limit = int(self._read(d / "memory.limit_in_bytes"))
        return MemoryStats(
            usage_bytes=usage,
            working_set_bytes=max(0, usage - inactive),
            limit_bytes=None if limit >= V1_UNLIMITED_MEMORY else limit,
        )

    def write_memory_limit(self, cgroup: str, limit_bytes: int | None) -> None:
        value = "-1" if limit_bytes is None else str(limit_bytes)
        self._write(self._dir("memory", cgroup) / "memory.limit_in_bytes", value)

    def pressure(self, cgroup: str) -> Pressure | None:
        return None  # v1 has no per-cgroup PSI; the collector falls back to /proc/pressure

    def memory_events_file(self, cgroup: str) -> Path:
        return self._dir("memory", cgroup) / "memory.oom_control"

    def io_stats(self, cgroup: str) -> dict[str, IoStats]:
        """Per device, from blk-throttle's ``blkio.throttle.io_service_bytes`` and
        ``..._serviced`` (counted whether or not a limit is set); empty without blkio."""
        d = self.root / "blkio" / cgroup.strip("/")
        if not (d / "blkio.throttle.io_service_bytes").exists():
            return {}
        rows: dict[str, dict[str, int]] = {}
        for name, suffix in (("io_service_bytes", "bytes"), ("io_serviced", "ops")):
            for line in self._read(d / f"blkio.throttle.{name}").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("Read", "Write") and parts[2].isdigit():
                    rows.setdefault(parts[0], {})[f"{parts[1]}_{suffix}"] = int(parts[2])
        return {
            dev: IoStats(
                r.get("Read_bytes", 0),
                r.get("Write_bytes", 0),
                r.get("Read_ops", 0),
                r.get("Write_ops", 0),
            )
            for dev, r in rows.items()
        }


class CgroupV2Fs(CgroupFs):
    """The unified hierarchy: one directory per cgroup, ``cpu.max``, ``cpu.weight``, PSI files."""

    version = 2

    def dirs(self, cgroup: str) -> list[Path]:
        return [self.root / cgroup.strip("/")]

    def create(self, cgroup: str) -> None:
        # Controllers must be enabled in every ancestor's subtree_control.
        parts = [p for p in cgroup.strip("/").split("/") if p]
        parent = self.root
        for part in parts:
            ctl = parent / "cgroup.subtree_control"
            if ctl.exists():
                enabled = self._read(ctl).split()
                for want in ("cpu", "memory"):
                    if want not in enabled:
                        # A missing controller shows up as missing knob files later.
                        with contextlib.suppress(CgroupError):
                            self._write(ctl, f"+{want}")
            parent = parent / part
        super().create(cgroup)

    def _d(self, cgroup: str) -> Path:
        return self.dirs(cgroup)[0]

    def read_cpu(self, cgroup: str) -> CpuLimits:
        d = self._d(cgroup)
        quota_s, period_s = self._read(d / "cpu.max").split()
        burst_f, idle_f = d / "cpu.max.burst", d / "cpu.idle"
        return CpuLimits(
            quota_us=None if quota_s == "max" else int(quota_s),
            period_us=int(period_s),
            shares=weight_to_shares(int(self._read(d / "cpu.weight"))),
            burst_us=int(self._read(burst_f)) if burst_f.exists() else 0,
            idle=bool(int(self._read(idle_f))) if idle_f.exists() else False,
        )

    def write_cpu(self, cgroup: str, limits: CpuLimits) -> None:
        d = self._d(cgroup)
        current = self.read_cpu(cgroup)
        quota = "max" if limits.quota_us is None else str(limits.quota_us)
        if limits.burst_us < current.burst_us:
            self._write(d / "cpu.max.burst", str(limits.burst_us))
        if (limits.quota_us, limits.period_us) != (current.quota_us, current.period_us):
            self._write(d / "cpu.max", f"{quota} {limits.period_us}")
        if limits.burst_us > current.burst_us:
            self._write(d / "cpu.max.burst", str(limits.burst_us))
        if shares_to_weight(limits.shares) != shares_to_weight(current.shares):
            self._write(d / "cpu.weight", str(shares_to_weight(limits.shares)))
        if limits.idle != current.idle:
            if not (d / "cpu.idle").exists():
                raise CgroupError(f"cgroup {cgroup}: this kernel has no cpu.idle; use weight")
            self._write(d / "cpu.idle", "1" if limits.idle else "0")

    def normalize(self, limits: CpuLimits) -> CpuLimits:
        shares = weight_to_shares(shares_to_weight(limits.shares))
        return CpuLimits(limits.quota_us, limits.period_us, shares, limits.burst_us, limits.idle)

    def cpu_stats(self, cgroup: str) -> CpuStats:
        stat = _parse_kv(self._read(self._d(cgroup) / "cpu.stat"))
        return CpuStats(
            usage_ns=stat.get("usage_usec", 0) * 1000,
            nr_periods=stat.get("nr_periods", 0),
            nr_throttled=stat.get("nr_throttled", 0),
            throttled_ns=stat.get("throttled_usec", 0) * 1000,
        )

    def memory_stats(self, cgroup: str) -> MemoryStats:
        d = self._d(cgroup)
        if not (d / "memory.current").exists():
            return MemoryStats(0, 0, None)
        usage = int(self._read(d / "memory.current"))
        stat = _parse_kv(self._read(d / "memory.stat"))
        limit = self._read(d / "memory.max").strip()
        return MemoryStats(
            usage_bytes=usage,
            working_set_bytes=max(0, usage - stat.get("inactive_file", 0)),
            limit_bytes=None if limit == "max" else int(limit),
        )

    def write_memory_limit(self, cgroup: str, limit_bytes: int | None) -> None:
        self._write(
            self._d(cgroup) / "memory.max", "max" if limit_bytes is None else str(limit_bytes)
        )

    def memory_events_file(self, cgroup: str) -> Path:
        return self._d(cgroup) / "memory.events"

    def io_stats(self, cgroup: str) -> dict[str, IoStats]:
        """Per device, from ``io.stat`` (``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..``)."""
        f = self._d(cgroup) / "io.stat"
        if not f.exists():
            return {}
        out: dict[str, IoStats] = {}
        for line in self._read(f).splitlines():
            dev, *kvs = line.split()
            kv = {k: int(v) for k, _, v in (p.partition("=") for p in kvs) if v.isdigit()}
            out[dev] = IoStats(
                kv.get("rbytes", 0), kv.get("wbytes", 0), kv.get("rios", 0), kv.get("wios", 0)
            )
        return out

    def pressure(self, cgroup: str) -> Pressure | None:
        d = self._d(cgroup)
        values: dict[str, float | None] = {}
        for res in ("cpu", "memory", "io"):
            f = d / f"{res}.pressure"
            try:
                values[res] = parse_pressure(f.read_text()) if f.exists() else None
            except OSError:  # PSI disabled at boot: the file exists but reads EOPNOTSUPP
                values[res] = None
        if all(v is None for v in values.values()):
            return None
        return Pressure(values["cpu"], values["memory"], values["io"])


def detect_cgroupfs(root: Path = CGROUP_ROOT) -> CgroupFs:
    """The hierarchy this machine uses: v2 if ``root`` is the unified mount, else v1."""
    if (root / "cgroup.controllers").exists():
        return CgroupV2Fs(root)
    if (root / "cpu").is_dir():
        return CgroupV1Fs(root)
    raise CgroupError(
        f"no cgroup hierarchy found at {root}: neither cgroup v2 (cgroup.controllers) nor a v1 "
        "cpu controller; mount cgroupfs or set [qos] cgroup_root"
    )


def host_pressure(proc_root: Path = Path("/proc")) -> Pressure | None:
    """Node-wide PSI from ``/proc/pressure``; None when the kernel was built or booted without it."""
    values: dict[str, float | None] = {}
    for res in ("cpu", "memory", "io"):
        try:
            values[res] = parse_pressure((proc_root / "pressure" / res).read_text())
        except OSError:
            values[res] = None
    if all(v is None for v in values.values()):
        return None
    return Pressure(values["cpu"], values["memory"], values["io"])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def expand_cgroups(fs: CgroupFs, pattern: str) -> list[str]:
    """Cgroups matching a path pattern with shell wildcards per segment (``tidal/*``).

    Lets a rules file cover every container of the engine (``tidal/<id>``) or of kubelet
    (``kubepods/besteffort/*``) without naming each one; a pattern without wildcards is
    returned as is, whether or not it exists yet.
    """
    import fnmatch

    parts = [p for p in pattern.strip("/").split("/") if p]
    if not any(ch in pattern for ch in "*?["):
        return ["/".join(parts)]
    level = [""]
    for part in parts:
        nxt: list[str] = []
        for base in level:
            if any(ch in part for ch in "*?["):
                nxt += [
                    c for c in fs.children(base) if fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], part)
                ]
            else:
                nxt.append(f"{base}/{part}" if base else part)
        level = nxt
    return [c for c in level if fs.exists(c)]
