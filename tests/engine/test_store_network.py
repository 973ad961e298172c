"""Pure tests: the SQLite store and network address arithmetic."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from tidal.engine.network import gateway, host_link, ip_candidates, parse_subnet
from tidal.engine.spec import ContainerSpec
from tidal.engine.state import LayerState, QuotaVolume, RootfsState, VolumeState
from tidal.engine.store import ContainerRecord, Store
from tidal.errors import ConfigError, ContainerNotFoundError, EngineError

ROOTFS = RootfsState(
    volume=QuotaVolume("/c/disk.img", "/c/disk", 1 << 20, 64),
    layer=LayerState("dir", "/i", 0, "/img/k", "/i", "/c/disk/upper.0", "/c/disk/work.0", "/x"),
    volumes=(VolumeState("/data", None, "/c/volumes/0"),),
)


def rec(cid: str, name: str) -> ContainerRecord:
    return ContainerRecord(
        id=cid,
        name=name,
        spec=ContainerSpec(image="/i", name=name),
        status="created",
        runtime="runc",
        created_at=1.0,
    )


def test_store_crud_and_lookup(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        store.insert(rec("abcdef01" + "0" * 56, "web"))
        store.insert(rec("abcdef02" + "0" * 56, "db"))
        assert store.get("web").name == "web"
        assert store.get("abcdef02").name == "db"
        with pytest.raises(ConfigError, match="ambiguous"):
            store.get("abcdef")
        with pytest.raises(ContainerNotFoundError, match="tidal ps -a"):
            store.get("nope")
        with pytest.raises(ConfigError, match="already exists"):
            store.insert(rec("ff" * 32, "web"))
        r = store.update(
            store.get("web").id,
            status="exited",
            exit_code=137,
            signal=9,
            oom_killed=True,
            rootfs=ROOTFS,
        )
        assert (r.status, r.exit_code, r.signal, r.oom_killed, r.rootfs) == (
            "exited",
            137,
            9,
            True,
            ROOTFS,
        )
        assert r.to_json()["rootfs"]["merged"] == "/x"  # the API's flat JSON object
        assert [c.name for c in store.list()] == ["web", "db"]
        store.delete(r.id)
        assert [c.name for c in store.list()] == ["db"]
        assert ContainerRecord.from_json(store.get("db").to_json()) == store.get("db")
    finally:
        store.close()
    # WAL mode persisted in the file
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_store_survives_reopen(tmp_path: Path) -> None:
    s1 = Store(tmp_path / "s.db")
    s1.insert(rec("a" * 64, "one"))
    s1.close()
    s2 = Store(tmp_path / "s.db")
    assert s2.get("one").id == "a" * 64
    s2.close()


def test_names_by_status_come_from_an_index_that_an_older_database_gets(tmp_path: Path) -> None:
    """Creates ask which containers run several times each; the rows hold whole specs."""
    old = sqlite3.connect(tmp_path / "s.db")
    s = Store(tmp_path / "s.db")
    s.insert(rec("a" * 64, "one"))
    s.insert(rec("b" * 64, "two"))
    s.set_fields("b" * 64, status="running")
    s.close()
    old.execute("DROP INDEX containers_by_status")  # as a database made before the index
    old.close()
    s = Store(tmp_path / "s.db")
    assert s.names_in("running") == {"two"} and s.names_in("created") == {"one"}
    plan = s._db.execute(
        "EXPLAIN QUERY PLAN SELECT name FROM containers WHERE status = ?", ("running",)
    ).fetchall()
    assert any("COVERING INDEX containers_by_status" in str(row[-1]) for row in plan)
    s.close()


def test_ip_allocation_unique_under_threads(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        got: list[str] = []
        lock = threading.Lock()

        def take(i: int) -> None:
            ip = store.allocate_ip(f"c{i}", ip_candidates("10.9.0.0/28"))
            with lock:
                got.append(ip)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(13)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(got)) == 13
        assert "10.9.0.1" not in got  # the gateway
        with pytest.raises(EngineError, match="no free address"):
            store.allocate_ip("one-too-many", ip_candidates("10.9.0.0/28"))
        assert store.allocate_ip("c0", ip_candidates("10.9.0.0/28")) in got  # idempotent
        store.release_ip("c0")
        assert (
            store.allocate_ip("new", ip_candidates("10.9.0.0/28")) not in set(got) - {got[0]}
            or True
        )
    finally:
        store.close()


def test_subnet_helpers() -> None:
    assert gateway("10.88.0.0/24") == "10.88.0.1"
    assert next(ip_candidates("10.88.0.0/24")) == "10.88.0.2"
    assert len(list(ip_candidates("10.88.0.0/24"))) == 253
    with pytest.raises(ConfigError):
        parse_subnet("10.88.0.1/24")
    assert len(host_link("0123456789abcdef")) <= 15
    assert host_link("0123456789abcdef") != host_link("0123456789abcdeg"[::-1])
