"""The snapshotter's metadata: one sqlite database under its root (``metadata.db``).

sqlite because every change is one transaction that survives SIGKILL whole or not at all (WAL
journal, ``synchronous=FULL``), which is what "intent, then act, then record" needs; and it is
in the standard library. A directory or mount whose row is missing after a crash is an orphan
that :meth:`Snapshotter.cleanup` removes; a row whose mount is missing is remounted at start.

Parents are referenced by row id, so committing a snapshot (which renames its key) does not
touch its children.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from tidal.errors import SnapshotExistsError, SnapshotNotFoundError
from tidal.snapshotter.model import Kind, RemoteImage, Snapshot

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',
    remote      TEXT,
    size_bytes  INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    mount_state TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_COLUMNS = (
    "s.id, s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, s.labels, s.remote, "
    "s.size_bytes, s.inodes"
)
_SELECT = f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


def _now_ns() -> int:
    return time.time_ns()


def _remote_json(remote: RemoteImage | None) -> str | None:
    if remote is None:
        return None
    return json.dumps(
        {
            "reference": remote.reference,
            "manifest_digest": remote.manifest_digest,
            "layer_digest": remote.layer_digest,
        },
        sort_keys=True,
    )


def _row(row: tuple[object, ...]) -> Snapshot:
    rid, key, parent, kind, created, updated, labels, remote, size, inodes = row
    r = json.loads(str(remote)) if remote else None
    return Snapshot(
        id=int(str(rid)),
        key=str(key),
        parent=str(parent),
        kind=Kind(int(str(kind))),
        created_ns=int(str(created)),
        updated_ns=int(str(updated)),
        labels=json.loads(str(labels)),
        remote=RemoteImage(**r) if r else None,
        size_bytes=int(str(size)),
        inodes=int(str(inodes)),
    )


class MetaStore:
    """Rows of :class:`Snapshot`; every method is one transaction unless inside :meth:`tx`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One transaction (nested calls join the outer one); callers hold the service lock."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    # --- reads --------------------------------------------------------------------------------

    def find(self, key: str) -> Snapshot | None:
        row = self._db.execute(f"{_SELECT} WHERE s.key = ?", (key,)).fetchone()
        return _row(row) if row else None

    def get(self, key: str) -> Snapshot:
        snap = self.find(key)
        if snap is None:
            raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        return snap

    def by_id(self, rid: int) -> Snapshot:
        row = self._db.execute(f"{_SELECT} WHERE s.id = ?", (rid,)).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"snapshot #{rid} does not exist")
        return _row(row)

    def all(self) -> list[Snapshot]:
        return [_row(r) for r in self._db.execute(f"{_SELECT} ORDER BY s.id")]

    def ancestors(self, key: str) -> list[Snapshot]:
        """The parents of ``key``, nearest first (``key`` itself not included)."""
        out = []
        snap = self.get(key)
        while snap.parent:
            snap = self.get(snap.parent)
            out.append(snap)
        return out

    def children(self, key: str) -> int:
        snap = self.get(key)
        row = self._db.execute(
            "SELECT COUNT(*) FROM snapshots WHERE parent_id = ?", (snap.id,)
        ).fetchone()
        return int(row[0])

    def mount_state(self, key: str) -> str | None:
        row = self._db.execute("SELECT mount_state FROM snapshots WHERE key = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    # --- writes -------------------------------------------------------------------------------

    def insert(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: dict[str, str],
        *,
        remote: RemoteImage | None = None,
        mount_state: str | None = None,
    ) -> Snapshot:
        now = _now_ns()
        with self.tx():
            if self.find(key) is not None:
                raise SnapshotExistsError(f"snapshot {key!r} already exists")
            parent_id = self.get(parent).id if parent else None
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels, "
                "remote, mount_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    parent_id,
                    int(kind),
                    now,
                    now,
                    json.dumps(labels, sort_keys=True),
                    _remote_json(remote),
                    mount_state,
                ),
            )
            return self.by_id(int(cur.lastrowid or 0))

    def commit(
        self, key: str, name: str, labels: dict[str, str], size_bytes: int, inodes: int
    ) -> Snapshot:
        with self.tx():
            if self.find(name) is not None:
                raise SnapshotExistsError(f"snapshot {name!r} already exists")
            snap = self.get(key)
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated_ns = ?, "
                "size_bytes = ?, inodes = ?, mount_state = NULL WHERE id = ?",
                (
                    name,
                    int(Kind.COMMITTED),
                    json.dumps(labels, sort_keys=True),
                    _now_ns(),
                    size_bytes,
                    inodes,
                    snap.id,
                ),
            )
            return self.by_id(snap.id)

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self.tx():
            snap = self.get(key)
            self._db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (json.dumps(labels, sort_keys=True), _now_ns(), snap.id),
            )
            return self.by_id(snap.id)

    def set_mount_state(self, key: str, state: str | None) -> None:
        with self.tx():
            self._db.execute("UPDATE snapshots SET mount_state = ? WHERE key = ?", (state, key))

    def delete(self, key: str) -> None:
        with self.tx():
            self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
