"""The instance store parses a record file again only when it changed: what another writer
(a second store on the same directory, as a restarted daemon) puts there is seen, a rewrite
of the same size within the clock's granularity is seen (a rewrite is a new inode), and
unchanged files and the store's own writes are not re-parsed."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from tidal.ids import InstanceId
from tidal.instance.catalog import EMBEDDED_TYPES
from tidal.instance.spec import InstanceSpec, InstanceType
from tidal.instance.store import InstanceRecord, InstanceStore


def _rec(i: int, phase: str = "creating") -> InstanceRecord:
    return InstanceRecord(
        id=InstanceId(f"{i:032x}"),
        name=f"w{i}",
        spec=InstanceSpec(image="/img"),
        phase=phase,
        runtime="runc",
        cgroup=f"tidal/pod-{i:012x}",
        created_at=float(i),
        chosen=InstanceType("1c1g", EMBEDDED_TYPES["1c1g"]),
        limits=EMBEDDED_TYPES["1c1g"],
    )


def test_unchanged_records_are_not_parsed_again_and_changes_are_seen(tmp_path: Path) -> None:
    store, other = InstanceStore(tmp_path), InstanceStore(tmp_path)
    for i in range(20):
        store.put(_rec(i))
    with mock.patch.object(InstanceRecord, "from_json", wraps=InstanceRecord.from_json) as parse:
        assert [r.name for r in store.list()] == [f"w{i}" for i in range(20)]
        assert parse.call_count == 0  # its own writes: known without reading them back
        assert len(other.list()) == 20 and parse.call_count == 20  # a new reader reads them
        assert len(store.list()) == 20
        assert parse.call_count == 20  # nothing changed: nothing parsed
        other.put(_rec(3, phase="running"))  # another size
        other.put(_rec(4, phase="removing"))  # the same size as "creating", at once
        got = {r.name: r.phase for r in store.list()}
        assert parse.call_count == 22
    assert got["w3"] == "running" and got["w4"] == "removing"
    other.delete(_rec(5).id)
    assert "w5" not in {r.name for r in store.list()}
    assert store.get("w3").phase == "running"
