"""Warm pools against a fake sandbox factory: targets, the capacity bound, eviction, refill,
prewarm, drain and the member records (no host effects)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tidal.errors import ConfigError, InstanceError, NoCapacityError, TidalError
from tidal.instance.capacity import Capacity
from tidal.instance.pool import PoolKey, PoolMember, Pools, PoolStore
from tidal.instance.spec import InstanceSpec, Limits
from tidal.units import MiB

SMALL = PoolKey("runc", Limits(cpus=0.5, memory_bytes=64 * MiB))
BIG = PoolKey("runc", Limits(cpus=1.0, memory_bytes=128 * MiB))


class FakeFactory:
    """Members 'made' at once; capacity of ``cpus`` shared with ``live`` instances' CPUs."""

    def __init__(self, cpus: float, store: PoolStore) -> None:
        self.cpus = cpus
        self.live = 0.0
        self.store = store
        self.made: list[str] = []
        self.destroyed: list[str] = []
        self.fail_next = False
        self.phases_seen: list[str] = []
        self.lock = threading.Lock()

    def make_member(self, member: PoolMember) -> PoolMember:
        # state before effect: the record exists, saying "making", when the effect starts
        on_disk = {m.id: m.phase for m in self.store.list()}
        self.phases_seen.append(on_disk[member.id])
        if self.fail_next:
            self.fail_next = False
            raise InstanceError("the runtime refused the sandbox")
        with self.lock:
            self.made.append(member.id)
        return member.replace(phase="ready", sandbox_id="c" * 64, ip="10.0.0.2")

    def destroy_member(self, member: PoolMember) -> None:
        with self.lock:
            self.destroyed.append(member.id)

    def room_for(self, key: PoolKey, pooled: Capacity) -> bool:
        need = key.limits.cpus or 0.0
        return self.live + pooled.cpus + need <= self.cpus + 1e-9

    def key_of(self, spec: InstanceSpec) -> PoolKey:
        return PoolKey(spec.runtime or "runc", spec.limits)


def make(tmp_path: Path, cpus: float = 4.0, **kw: int) -> tuple[Pools, FakeFactory]:
    store = PoolStore(tmp_path / "pool")
    factory = FakeFactory(cpus, store)
    pools = Pools(store, factory, pool_min=kw.get("pool_min", 0), pool_max=kw.get("pool_max", 4))
    return pools, factory


def test_prewarm_fills_records_ready_members_and_take_hands_them_out(tmp_path: Path) -> None:
    pools, factory = make(tmp_path)
    pools.prewarm(SMALL, 3)
    assert factory.phases_seen == ["making"] * 3
    assert sorted(m.phase for m in pools.store.list()) == ["ready"] * 3
    (st,) = pools.status()
    assert (st["target"], st["ready"], st["in_use"]) == (3, 3, 0)
    got = pools.take(SMALL)
    assert got is not None and got.phase == "ready" and got.key == SMALL
    assert pools.take(BIG) is None  # another shape: a miss
    (big, small) = sorted(pools.status(), key=lambda s: s["ready"])
    assert (small["ready"], small["in_use"], small["hits"]) == (2, 1, 1)
    assert (big["misses"], big["ready"]) == (1, 0)


def test_prewarm_takes_a_spec_as_the_agreed_interface_says(tmp_path: Path) -> None:
    pools, _ = make(tmp_path)
    pools.prewarm(InstanceSpec(image="/img", command=("true",), limits=SMALL.limits), 2)
    pools.wait_ready(timeout_s=1.0)
    assert pools.take(SMALL) is not None and pools.target(SMALL) == 2


def test_prewarm_beyond_pool_max_or_capacity_is_refused(tmp_path: Path) -> None:
    pools, _ = make(tmp_path, cpus=1.0)
    with pytest.raises(ConfigError, match=r"outside 0\.\.\[instance\] pool_max"):
        pools.prewarm(SMALL, 5)
    with pytest.raises(NoCapacityError, match="no room for another warm sandbox"):
        pools.prewarm(SMALL, 3)  # 3 x 0.5 CPUs on a 1-CPU node
    assert len(pools.store.list()) == 2
    off, _ = make(tmp_path / "off", pool_max=0)
    assert off.take(SMALL) is None
    with pytest.raises(ConfigError, match="pools are off"):
        off.prewarm(SMALL, 1)


def test_refill_keeps_pools_within_the_node_and_learns_from_creates(tmp_path: Path) -> None:
    pools, factory = make(tmp_path, cpus=2.0, pool_max=8)
    for _ in range(6):  # a burst: six creates within one refill time, all misses
        assert pools.take(SMALL) is None
    assert pools.target(SMALL) == 6
    pools.start()
    try:
        with pytest.raises(InstanceError, match=r"not filled within.*4 of 6 \(held back: no room"):
            pools.wait_ready(timeout_s=1.5)  # room for only 4 x 0.5 CPUs
        (st,) = pools.status()
        assert st["ready"] == 4 and st["no_room"]
        assert pools.pooled().cpus == pytest.approx(2.0)
        factory.live = 1.0  # instances now hold one CPU: no new member, the 4 stay
        time.sleep(1.2)  # more than one refill tick
        assert pools.pooled().cpus == pytest.approx(2.0)
    finally:
        pools.close()


def test_evict_prefers_other_shapes_and_drain_leaves_nothing(tmp_path: Path) -> None:
    pools, factory = make(tmp_path)
    pools.prewarm(SMALL, 2)
    pools.prewarm(BIG, 1)
    victim = pools.evict_one(prefer_not=SMALL)
    assert victim is not None and victim.key == BIG
    pools.destroy(victim)
    assert victim.id in factory.destroyed
    assert {m.id for m in pools.store.list()} == {m for m in factory.made if m != victim.id}
    assert pools.drain() == 2
    assert pools.store.list() == []
    assert all(s["target"] == 0 for s in pools.status())


def test_a_failed_member_is_torn_down_and_its_record_dropped(tmp_path: Path) -> None:
    pools, factory = make(tmp_path)
    factory.fail_next = True
    with pytest.raises(TidalError, match="refused the sandbox"):
        pools.prewarm(SMALL, 1)
    assert len(factory.destroyed) == 1
    assert pools.store.list() == []
    (st,) = pools.status()
    assert "refused" in st["last_error"]


def test_a_release_goes_back_only_below_target(tmp_path: Path) -> None:
    pools, _ = make(tmp_path)
    pools.prewarm(SMALL, 2)
    a = pools.take(SMALL)
    assert a is not None
    assert pools.wants(SMALL)  # 1 ready of 2
    pools.add_ready(a.replace(id="f" * 32))
    assert not pools.wants(SMALL)
    pools.released(SMALL, from_pool=True)
    (st,) = pools.status()
    assert (st["ready"], st["in_use"], st["releases_in_window"]) == (2, 0, 1)


def test_member_records_round_trip_and_reject_bad_phases(tmp_path: Path) -> None:
    m = PoolMember("a" * 32, SMALL, "ready", "tidal/pod-aaaa", 1.0, "c" * 64, "10.0.0.9", ("x",))
    assert PoolMember.from_json(m.to_json()) == m
    assert m.sandbox_name == f"pool.{'a' * 16}.sandbox"
    bad = m.to_json() | {"phase": "running"}
    with pytest.raises(ConfigError, match="pool member record is malformed"):
        PoolMember.from_json(bad)
    assert SMALL.id != BIG.id and SMALL.id == PoolKey.from_json(SMALL.to_json()).id


def test_refill_waits_for_the_creates_in_flight(tmp_path: Path) -> None:
    """A hit's start must not share the CPUs with the refill of the member it just took."""
    pools, factory = make(tmp_path, pool_min=1)
    pools.prewarm(SMALL, 1)
    made_before = len(factory.made)
    pools.start()
    try:
        with pools.creating():
            assert pools.take(SMALL) is not None
            time.sleep(0.5)  # the refill was woken by the take; it waits for this create
            assert len(factory.made) == made_before
        deadline = time.monotonic() + 5
        while len(factory.made) == made_before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(factory.made) == made_before + 1, "refilled once the create was done"
    finally:
        pools.close()
