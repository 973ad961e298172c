"""A cgroup tree on an ordinary directory, for tests: the real fs classes over fake files.

The kernel fills a new cgroup directory with its knob files; a plain directory does not, so
these subclasses write the same files with the kernel's defaults on ``create``. Tests drive
usage with :meth:`FakeCgroupV1Fs.set_usage` and can make a knob fail with :meth:`break_knob`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from tidal.cgroups import V1_UNLIMITED_MEMORY, CgroupV1Fs, CgroupV2Fs
from tidal.errors import CgroupError


class _BreakMixin:
    _broken: set[Path]

    def break_knob(self, cgroup: str, knob: str) -> None:
        """Make every later write to ``knob`` of ``cgroup`` fail (reads still work)."""
        if not hasattr(self, "_broken"):
            self._broken = set()
        for d in self.dirs(cgroup):  # type: ignore[attr-defined]
            self._broken.add(d / knob)

    def _write(self, path: Path, value: str) -> None:
        if path in getattr(self, "_broken", ()):
            raise CgroupError(f"cannot write {value!r} to cgroup file {path}: Invalid argument")
        super()._write(path, value)  # type: ignore[misc]


class FakeCgroupV1Fs(_BreakMixin, CgroupV1Fs):
    DEFAULTS: ClassVar[dict[str, dict[str, str]]] = {
        "cpu": {
            "cpu.cfs_quota_us": "-1",
            "cpu.cfs_period_us": "100000",
            "cpu.cfs_burst_us": "0",
            "cpu.shares": "1024",
            "cpu.idle": "0",
            "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
            "cgroup.procs": "",
        },
        "cpuacct": {"cpuacct.usage": "0", "cgroup.procs": ""},
        "memory": {
            "memory.usage_in_bytes": "0",
            "memory.limit_in_bytes": "9223372036854771712",
            "memory.stat": "total_inactive_file 0\n",
            "cgroup.procs": "",
        },
    }

    def __init__(self, root: Path) -> None:
        for c in self.CONTROLLERS:
            (Path(root) / c).mkdir(parents=True, exist_ok=True)
            self._fill(Path(root) / c, c)
        super().__init__(root, self.CONTROLLERS)

    def _fill(self, d: Path, controller: str) -> None:
        for name, value in self.DEFAULTS[controller].items():
            if not (d / name).exists():
                (d / name).write_text(value)

    def _populate(self, directory: Path) -> None:
        controller = directory.relative_to(self.root).parts[0]
        self._fill(directory, controller)

    def remove(self, cgroup: str) -> None:
        for d in self.dirs(cgroup):
            for f in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if f.is_dir():
                    f.rmdir()
                else:
                    f.unlink()
            if d.exists():
                d.rmdir()

    def add_process(self, cgroup: str, pid: int) -> None:
        for d in self.dirs(cgroup):
            f = d / "cgroup.procs"
            f.write_text(f.read_text() + f"{pid}\n")

    def write_memory_limit(self, cgroup: str, limit_bytes: int | None) -> None:
        # The kernel turns -1 into PAGE_COUNTER_MAX; so does the fake.
        super().write_memory_limit(cgroup, limit_bytes)
        if limit_bytes is None:
            (self._dir("memory", cgroup) / "memory.limit_in_bytes").write_text(
                str(V1_UNLIMITED_MEMORY)
            )

    def set_usage(
        self,
        cgroup: str,
        *,
        cpu_usage_ns: int | None = None,
        memory_bytes: int | None = None,
        throttled: tuple[int, int, int] | None = None,
    ) -> None:
        if cpu_usage_ns is not None:
            (self._dir("cpuacct", cgroup) / "cpuacct.usage").write_text(str(cpu_usage_ns))
        if memory_bytes is not None:
            (self._dir("memory", cgroup) / "memory.usage_in_bytes").write_text(str(memory_bytes))
        if throttled is not None:
            periods, nr, t_ns = throttled
            (self._dir("cpu", cgroup) / "cpu.stat").write_text(
                f"nr_periods {periods}\nnr_throttled {nr}\nthrottled_time {t_ns}\n"
            )


class FakeCgroupV2Fs(_BreakMixin, CgroupV2Fs):
    DEFAULTS: ClassVar[dict[str, str]] = {
        "cpu.max": "max 100000",
        "cpu.max.burst": "0",
        "cpu.weight": "100",
        "cpu.idle": "0",
        "cpu.stat": "usage_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "cpu.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        "memory.current": "0",
        "memory.max": "max",
        "memory.stat": "inactive_file 0\n",
        "cgroup.procs": "",
        "cgroup.subtree_control": "",
    }

    def __init__(self, root: Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cgroup.controllers").write_text("cpu memory\n")
        self._populate(Path(root))
        super().__init__(root)

    def _populate(self, directory: Path) -> None:
        for name, value in self.DEFAULTS.items():
            if not (directory / name).exists():
                (directory / name).write_text(value)

    def remove(self, cgroup: str) -> None:
        d = self.dirs(cgroup)[0]
        for f in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        if d.exists():
            d.rmdir()

    def add_process(self, cgroup: str, pid: int) -> None:
        f = self.dirs(cgroup)[0] / "cgroup.procs"
        f.write_text(f.read_text() + f"{pid}\n")

    def set_usage(
        self,
        cgroup: str,
        *,
        cpu_usage_ns: int | None = None,
        memory_bytes: int | None = None,
        pressure_avg10: float | None = None,
    ) -> None:
        d = self.dirs(cgroup)[0]
        if cpu_usage_ns is not None:
            (d / "cpu.stat").write_text(
                f"usage_usec {cpu_usage_ns // 1000}\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
            )
        if memory_bytes is not None:
            (d / "memory.current").write_text(str(memory_bytes))
        if pressure_avg10 is not None:
            (d / "cpu.pressure").write_text(
                f"some avg10={pressure_avg10:.2f} avg60=0.00 avg300=0.00 total=0\n"
            )
