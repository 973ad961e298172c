"""Executor: apply cgroup changes atomically, verify them, roll back failures, journal them.

Write-ahead journal (``journal.json`` in the state directory, replaced atomically): before the
agent first touches a cgroup it records the cgroup's original values (the restore target);
after each change it records what it applied. So whoever finds the journal (a restarted agent,
the watchdog process of a dead agent, ``tidal qos restore``) can put every cgroup back, or a
restarted agent can re-adopt values that are still as it left them.

Each change is all-or-nothing per cgroup: write, read back, compare with what the kernel should
report; on any error or mismatch the previous values are written back (and verified) and an
:class:`AdjustmentError` is raised. Every attempt is recorded with before/after values.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.cgroups import CgroupFs, CpuLimits
from tidal.errors import AdjustmentError, CgroupError, QosError
from tidal.fsutil import write_json_atomic

log = logging.getLogger(__name__)
JOURNAL_NAME = "journal.json"
HISTORY_LENGTH = 1000


@dataclass(frozen=True)
class Values:
    """The values of one cgroup that the agent may change."""

    cpu: CpuLimits
    memory_limit_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu.to_dict(), "memory_limit_bytes": self.memory_limit_bytes}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Values:
        return Values(CpuLimits.from_dict(d["cpu"]), d.get("memory_limit_bytes"))


@dataclass(frozen=True)
class Adjustment:
    """One attempted change, as recorded for the API and the log."""

    t: float
    cgroup: str
    before: Values
    after: Values
    rule: str
    reason: str
    ok: bool
    error: str | None = None
    rolled_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "cgroup": self.cgroup,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "rule": self.rule,
            "reason": self.reason,
            "ok": self.ok,
            "error": self.error,
            "rolled_back": self.rolled_back,
        }


class Journal:
    """Original and applied values per cgroup, persisted atomically (write temp, fsync, rename)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / JOURNAL_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        self.state = "running"
        self.agent_pid = os.getpid()
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                self.entries = dict(doc.get("entries", {}))
                self.state = str(doc.get("state", "running"))
                self.agent_pid = int(doc.get("agent_pid", 0))
            except (OSError, ValueError, TypeError) as exc:
                raise QosError(
                    f"QoS journal {self.path} is unreadable ({exc}); inspect it, restore the "
                    "cgroups it names by hand if needed, then delete it"
                ) from exc

    def original(self, cgroup: str) -> Values | None:
        e = self.entries.get(cgroup)
        return Values.from_dict(e["original"]) if e else None

    def applied(self, cgroup: str) -> Values | None:
        e = self.entries.get(cgroup)
        return Values.from_dict(e["applied"]) if e and e.get("applied") else None

    def record(self, cgroup: str, original: Values, applied: Values | None) -> None:
        entry = self.entries.setdefault(
            cgroup, {"original": original.to_dict(), "since": time.time()}
        )
        entry["applied"] = applied.to_dict() if applied else None
        self.save()

    def forget(self, cgroup: str) -> None:
        if self.entries.pop(cgroup, None) is not None:
            self.save()

    def save(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"state": self.state, "agent_pid": os.getpid(), "entries": self.entries}
        write_json_atomic(self.path, doc, fsync=True, indent=1, sort_keys=True)

    def delete(self) -> None:
        self.entries = {}
        self.path.unlink(missing_ok=True)


class Executor:
    """Applies values to cgroups through a :class:`CgroupFs`; thread-safe."""

    def __init__(self, fs: CgroupFs, state_dir: Path) -> None:
        self.fs = fs
        self.journal = Journal(state_dir)
        self.history: deque[Adjustment] = deque(maxlen=HISTORY_LENGTH)
        self.counts = {"applied": 0, "failed": 0, "rolled_back": 0}
        self._lock = threading.RLock()

    def read(self, cgroup: str) -> Values:
        return Values(self.fs.read_cpu(cgroup), self.fs.memory_stats(cgroup).limit_bytes)

    def _write(self, cgroup: str, values: Values, current: Values) -> None:
        if values.cpu != current.cpu:
            self.fs.write_cpu(cgroup, values.cpu)
        if values.memory_limit_bytes != current.memory_limit_bytes:
            self.fs.write_memory_limit(cgroup, values.memory_limit_bytes)

    def _expected(self, values: Values) -> Values:
        return Values(self.fs.normalize(values.cpu), values.memory_limit_bytes)

    def _verify(self, cgroup: str, values: Values) -> Values:
        got = self.read(cgroup)
        if got != self._expected(values):
            raise AdjustmentError(
                f"cgroup {cgroup} reads back {got.to_dict()} after writing {values.to_dict()}; "
                "another agent or the kernel changed it"
            )
        return got

    def baseline(self, cgroup: str) -> Values:
        """The values to restore: recorded originals, or the current values if never touched."""
        with self._lock:
            return self.journal.original(cgroup) or self.read(cgroup)

    def apply(
        self, cgroup: str, target: Values, rule: str = "manual", reason: str = ""
    ) -> Adjustment:
        """Change one cgroup to ``target``; raises :class:`AdjustmentError` after a rollback."""
        with self._lock:
            before = self.read(cgroup)
            original = self.journal.original(cgroup) or before
            if target == before:
                return Adjustment(time.time(), cgroup, before, before, rule, reason, True)
            # Write-ahead: the journal knows the original before the cgroup changes.
            self.journal.record(cgroup, original, self.journal.applied(cgroup))
            try:
                self._write(cgroup, target, before)
                self._verify(cgroup, target)
            except (CgroupError, AdjustmentError, OSError) as exc:
                rolled = self._rollback(cgroup, before)
                adj = Adjustment(
                    time.time(), cgroup, before, target, rule, reason, False, str(exc), rolled
                )
                self.history.append(adj)
                self.counts["failed"] += 1
                self.counts["rolled_back"] += int(rolled)
                raise AdjustmentError(
                    f"adjusting cgroup {cgroup} ({rule}) failed: {exc}; "
                    + (
                        "rolled back to the previous values"
                        if rolled
                        else "ROLLBACK FAILED, see the journal"
                    )
                ) from exc
            if self._expected(target) == self._expected(original):
                self.journal.forget(cgroup)  # back at the spec: nothing left to restore
            else:
                self.journal.record(cgroup, original, target)
            adj = Adjustment(time.time(), cgroup, before, target, rule, reason, True)
            self.history.append(adj)
            self.counts["applied"] += 1
            log.info("qos: %s %s -> %s (%s: %s)", cgroup, before.cpu, target.cpu, rule, reason)
            return adj

    def _rollback(self, cgroup: str, before: Values) -> bool:
        try:
            current = self.read(cgroup)
            self._write(cgroup, before, current)
            self._verify(cgroup, before)
        except (CgroupError, AdjustmentError, OSError) as exc:
            log.error("qos: rollback of %s failed: %s", cgroup, exc)
            return False
        return True

    def restore_all(self) -> list[str]:
        """Put every journaled cgroup back to its original values; returns problems (empty = all ok)."""
        problems = []
        with self._lock:
            for cgroup in list(self.journal.entries):
                original = self.journal.original(cgroup)
                assert original is not None
                try:
                    if not self.fs.exists(cgroup):
                        self.journal.forget(cgroup)  # the container is gone; nothing to restore
                        continue
                    self.apply(cgroup, original, "restore", "agent stopping or restarting")
                    self.journal.forget(cgroup)
                except (QosError, OSError) as exc:
                    problems.append(f"{cgroup}: {exc}")
        return problems

    def forget_vanished(self) -> list[str]:
        """Drop journal entries of cgroups that no longer exist (their container was removed)."""
        gone = []
        with self._lock:
            for cgroup in list(self.journal.entries):
                if not self.fs.exists(cgroup):
                    self.journal.forget(cgroup)
                    gone.append(cgroup)
        return gone

    def adopt(self) -> tuple[list[str], list[str]]:
        """After a restart: keep recorded changes still in place, drop those someone overwrote."""
        adopted, dropped = [], []
        with self._lock:
            for cgroup in list(self.journal.entries):
                applied = self.journal.applied(cgroup)
                try:
                    current = self.read(cgroup) if self.fs.exists(cgroup) else None
                except CgroupError:
                    current = None
                if (
                    current is not None
                    and applied is not None
                    and current == self._expected(applied)
                ):
                    adopted.append(cgroup)
                else:
                    self.journal.forget(cgroup)
                    dropped.append(cgroup)
            self.journal.save("running")
        return adopted, dropped
