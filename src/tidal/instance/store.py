"""Instance records: one JSON file per instance, written before the effect it describes.

``<engine state>/instances/<id>.json`` holds the spec, the chosen type and limits, the pod's
cgroup and the phase (``creating`` -> ``running`` | ``stopped``, ``removing``). The file is
written atomically (rename) *before* the host is touched, and the containers' names are
derived from the instance's name, so a daemon SIGKILLed at any point finds everything an
instance made: a ``creating`` instance is rolled back, a ``removing`` one finished (see
:meth:`tidal.instance.manager.InstanceManager.reconcile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.errors import ConfigError, InstanceNotFoundError
from tidal.fsutil import write_text_atomic
from tidal.ids import InstanceId
from tidal.instance.spec import MAIN, InstanceSpec, InstanceType, Limits

PHASES = ("creating", "running", "stopped", "removing")
SANDBOX = "sandbox"


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as the node knows it. Times are UNIX seconds."""

    id: InstanceId
    name: str
    spec: InstanceSpec
    phase: str
    runtime: str
    cgroup: str
    """The pod's cgroup path below each hierarchy's root (``tidal/pod-<id12>``)."""
    created_at: float
    chosen: InstanceType | None = None
    """The instance type the fallback took (None: ad-hoc limits only)."""
    limits: Limits = dataclasses.field(default_factory=Limits)
    """What is applied: the type's limits with the ad-hoc values over them."""
    ip: str | None = None
    unenforced: tuple[str, ...] = ()
    """Limits the kernel could not enforce here, each with the reason."""
    error: str | None = None
    sandbox_id: str | None = None
    """The sandbox container's id when it came from a warm pool (or goes back to one): it is
    renamed at hand-out, so removal finds it by id whatever its name is at the time."""
    pool_member: str | None = None
    """The pool member record this instance's sandbox came from or returns to
    (:mod:`tidal.instance.pool`): a record naming a member owns that member's sandbox."""
    timings: tuple[tuple[str, float], ...] = ()
    """Each phase of ``run`` and its wall-clock seconds, in order (``total`` last)."""

    def member_names(self) -> tuple[str, ...]:
        """The pod's containers by member name, sandbox first, in start order."""
        return (SANDBOX, MAIN, *(m.name for m in self.spec.members))

    def container_name(self, member: str) -> str:
        return f"{self.name}.{member}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "spec": self.spec.to_json(),
            "phase": self.phase,
            "runtime": self.runtime,
            "cgroup": self.cgroup,
            "created_at": self.created_at,
            "chosen": self.chosen.to_json() if self.chosen else None,
            "limits": self.limits.to_json(),
            "ip": self.ip,
            "unenforced": list(self.unenforced),
            "error": self.error,
            "sandbox_id": self.sandbox_id,
            "pool_member": self.pool_member,
            "timings": {phase: round(s, 6) for phase, s in self.timings},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        try:
            return cls(
                id=InstanceId(str(data["id"])),
                name=str(data["name"]),
                spec=InstanceSpec.from_json(data["spec"]),
                phase=str(data["phase"]),
                runtime=str(data["runtime"]),
                cgroup=str(data["cgroup"]),
                created_at=float(data["created_at"]),
                chosen=InstanceType.from_json(data["chosen"]) if data.get("chosen") else None,
                limits=Limits.from_json(dict(data.get("limits") or {})),
                ip=data.get("ip"),
                unenforced=tuple(data.get("unenforced") or ()),
                error=data.get("error"),
                sandbox_id=data.get("sandbox_id"),
                pool_member=data.get("pool_member"),
                timings=tuple(
                    (str(k), float(v)) for k, v in dict(data.get("timings") or {}).items()
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"instance record is malformed: {exc!r}") from exc

    def replace(self, **changes: Any) -> InstanceRecord:
        return dataclasses.replace(self, **changes)


class InstanceStore:
    """The records of one node (thread-safe; files, so a reader never sees half a write)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._parsed: dict[str, tuple[int, InstanceRecord]] = {}
        """Records already parsed (or written here), by file name, with the file's inode then:
        each write renames a new file into place, so a rewrite by anyone changes the inode,
        and the directory listing alone (``d_ino``, no ``stat``) tells what changed."""

    def _path(self, iid: str) -> Path:
        return self.dir / f"{iid}.json"

    def put(self, rec: InstanceRecord) -> InstanceRecord:
        with self._lock:
            # rename, no fsync: the record must survive a SIGKILLed daemon (the page cache
            # does), as the engine's SQLite state does with synchronous=NORMAL; a host crash
            # takes the containers with it anyway
            path = self._path(rec.id)
            write_text_atomic(path, json.dumps(rec.to_json(), indent=1))
            with contextlib.suppress(OSError):
                self._parsed[path.name] = (os.stat(path).st_ino, rec)
        return rec

    def delete(self, iid: str) -> None:
        with self._lock:
            self._path(iid).unlink(missing_ok=True)

    def list(self) -> list[InstanceRecord]:
        """Every record, from the files; a file whose inode is the one last read or written
        here is not read again. With hundreds of live instances, parsing them all cost ~1.6 ms
        each on every create and removal, and a ``stat`` of each still a fifth of the daemon's
        Python time in a 400-instance burst: one ``scandir`` now."""
        with self._lock:
            recs = []
            seen = set()
            with os.scandir(self.dir) as entries:
                for e in entries:
                    if not e.name.endswith(".json"):
                        continue
                    try:
                        cached = self._parsed.get(e.name)
                        if cached is not None and cached[0] == e.inode():
                            rec = cached[1]
                        else:
                            with open(e.path) as fh:
                                ino = os.fstat(fh.fileno()).st_ino
                                rec = InstanceRecord.from_json(json.load(fh))
                            self._parsed[e.name] = (ino, rec)
                    except (OSError, ValueError):
                        continue  # removed meanwhile
                    seen.add(e.name)
                    recs.append(rec)
            for gone in set(self._parsed) - seen:
                del self._parsed[gone]
        return sorted(recs, key=lambda r: r.created_at)

    def get(self, ref: str) -> InstanceRecord:
        """By name, full id or unique id prefix (at least 4 characters)."""
        recs = self.list()
        for r in recs:
            if ref in (r.name, r.id):
                return r
        if len(ref) >= 4:
            hits = [r for r in recs if r.id.startswith(ref)]
            if len(hits) > 1:
                raise ConfigError(f"instance id prefix {ref!r} is ambiguous; give more of it")
            if hits:
                return hits[0]
        raise InstanceNotFoundError(
            f"no instance {ref!r}; 'tidal instance ls' lists the ones that exist"
        )
