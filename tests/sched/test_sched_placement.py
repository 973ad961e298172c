"""Placement by resource policy: owned first up to the threshold, then virtual pools in order."""

from __future__ import annotations

import pytest

from tidal.errors import ConfigError, StockError
from tidal.ids import NodeName
from tidal.sched.model import (
    ClusterSnapshot,
    NodeKind,
    OwnedNode,
    Pod,
    Resources,
    VirtualPool,
    VirtualSpec,
)
from tidal.sched.placement import (
    DELETION_COST_ANNOTATION,
    NextUnitWhen,
    ResourcePolicy,
    Strategy,
    Unit,
    choose_spec,
    cordon,
    deletion_costs,
    place,
    scale_in,
)

R2C4G = Resources(2000, 4096)
SPECS = (VirtualSpec.of("2c2g", 1.5), VirtualSpec.of("2c4g", 1.8), VirtualSpec.of("4c8g", 3.0))


def node(name: str, cpus: int = 10, ceiling: float = 0.6, **labels: str) -> OwnedNode:
    return OwnedNode(NodeName(name), Resources(cpus * 1000, cpus * 4096), ceiling, labels)


def pool(name: str, site: str, stock: dict[str, int] | None = None) -> VirtualPool:
    return VirtualPool(name, NodeName(f"vk-{name}"), site, SPECS, stock or {})


def pods(service: str, n: int, req: Resources = R2C4G, start: int = 0) -> list[Pod]:
    return [
        Pod(f"{service}-{i}", service, req, created_s=float(i)) for i in range(start, start + n)
    ]


def test_owned_up_to_threshold_then_virtual_pools_in_order() -> None:
    snap = ClusterSnapshot((node("n1"), node("n2")), (pool("a", "cloud-a"), pool("b", "cloud-b")))
    plan = place(snap, pods("web", 5), {"web": ResourcePolicy.hybrid(3, ["a", "b"])})
    kinds = [b.kind for b in plan.bindings]
    assert kinds == [NodeKind.OWNED] * 3 + [NodeKind.VIRTUAL] * 2
    assert {b.node for b in plan.bindings[3:]} == {"vk-a"}
    assert not plan.pending


def test_owned_respects_the_ceiling_and_packs_the_fullest_node_first() -> None:
    # 10 cpus at ceiling 0.6 = 6 cpus = three 2-cpu pods per node
    snap = ClusterSnapshot((node("n1"), node("n2")), (pool("a", "cloud-a"),))
    plan = place(snap, pods("web", 7), {"web": ResourcePolicy.hybrid(None, ["a"])})
    per_node: dict[str, int] = {}
    for b in plan.bindings:
        per_node[b.node] = per_node.get(b.node, 0) + 1
    assert per_node == {"n1": 3, "n2": 3, "vk-a": 1}


def test_anti_affinity_puts_one_replica_per_owned_node() -> None:
    snap = ClusterSnapshot((node("n1"), node("n2")), (pool("a", "cloud-a"),))
    pol = ResourcePolicy.hybrid(None, ["a"], anti_affinity=True)
    plan = place(snap, pods("db", 3), {"db": pol})
    assert [b.node for b in plan.bindings] == ["n1", "n2", "vk-a"]


def test_existing_pods_count_against_threshold_and_capacity() -> None:
    existing = (Pod("web-old", "web", R2C4G, node=NodeName("n1")),)
    snap = ClusterSnapshot((node("n1"),), (pool("a", "cloud-a"),), existing)
    plan = place(snap, pods("web", 2), {"web": ResourcePolicy.hybrid(2, ["a"])})
    assert [b.kind for b in plan.bindings] == [NodeKind.OWNED, NodeKind.VIRTUAL]


def test_spec_upgrade_on_stock_shortage_never_to_a_smaller_spec() -> None:
    p = pool("a", "cloud-a", {"2c4g": 1, "4c8g": 5})
    snap = ClusterSnapshot((), (p,))
    plan = place(snap, pods("web", 3), {"web": ResourcePolicy.hybrid(0, ["a"])})
    specs = [b.spec for b in plan.bindings]
    # 2c2g is cheaper but too small for 2c4g: never chosen; 2c4g sells out after one pod
    assert specs == ["2c4g", "4c8g", "4c8g"]
    assert plan.upgrades == 2
    assert all(b.requested_spec == "2c4g" for b in plan.bindings)


def test_choose_spec_raises_a_stock_error_naming_the_pool_and_fix() -> None:
    p = pool("a", "cloud-a")
    with pytest.raises(StockError, match="virtual pool a: spec 2c4g and every upgrade"):
        choose_spec(p, R2C4G, {"2c2g": 9, "2c4g": 0, "4c8g": 0})
    with pytest.raises(StockError, match="no spec holds"):
        choose_spec(p, Resources(16000, 1024), {})


def test_sold_out_site_fails_over_to_the_next_cloud() -> None:
    a = pool("a", "cloud-a", {"2c4g": 0, "4c8g": 0})
    snap = ClusterSnapshot((), (a, pool("b", "cloud-b")))
    plan = place(snap, pods("web", 2), {"web": ResourcePolicy.hybrid(0, ["a", "b"])})
    assert {b.node for b in plan.bindings} == {"vk-b"}


def test_failed_site_and_cordon_skip_pools_until_uncordoned() -> None:
    snap = ClusterSnapshot((), (pool("a", "cloud-a"), pool("b", "cloud-b")))
    pol = {"web": ResourcePolicy.hybrid(0, ["a", "b"])}
    failed = ClusterSnapshot(snap.owned, snap.pools, failed_sites=frozenset({"cloud-a"}))
    assert {b.node for b in place(failed, pods("web", 1), pol).bindings} == {"vk-b"}
    cordoned = cordon(snap, site="cloud-a")
    assert {b.node for b in place(cordoned, pods("web", 1), pol).bindings} == {"vk-b"}
    both = cordon(cordoned, pool="b")
    plan = place(both, pods("web", 1), pol)
    assert not plan.bindings and "no owned node" in plan.pending[0].reason
    back = cordon(both, site="cloud-a", on=False)
    assert {b.node for b in place(back, pods("web", 1), pol).bindings} == {"vk-a"}
    with pytest.raises(ConfigError, match="known sites"):
        cordon(snap, site="mars")


def test_required_strategy_leaves_pods_pending_when_units_are_full() -> None:
    pol = ResourcePolicy((Unit(NodeKind.OWNED, max=1),), strategy=Strategy.REQUIRED)
    snap = ClusterSnapshot((node("n1"),), (pool("a", "cloud-a"),))
    plan = place(snap, pods("web", 2), {"web": pol})
    assert [b.node for b in plan.bindings] == ["n1"]
    assert plan.pending[0].pod == "web-1" and "required" in plan.pending[0].reason
    prefer = ResourcePolicy((Unit(NodeKind.OWNED, max=1),), strategy=Strategy.PREFER)
    plan = place(snap, pods("web", 2), {"web": prefer})
    assert len(plan.bindings) == 2 and plan.bindings[1].unit is None


def test_node_selector_limits_a_unit() -> None:
    pol = ResourcePolicy(
        (Unit(NodeKind.OWNED, {"zone": "z2"}), Unit(NodeKind.VIRTUAL)), strategy=Strategy.REQUIRED
    )
    snap = ClusterSnapshot((node("n1", zone="z1"), node("n2", zone="z2")), (pool("a", "cloud-a"),))
    plan = place(snap, pods("web", 4), {"web": pol})
    assert [b.node for b in plan.bindings] == ["n2", "n2", "n2", "vk-a"]


def test_exceed_max_rule_waits_for_owned_resources() -> None:
    pol = ResourcePolicy(
        (Unit(NodeKind.OWNED, max=5), Unit(NodeKind.VIRTUAL)),
        next_unit_when=NextUnitWhen.EXCEED_MAX,
    )
    snap = ClusterSnapshot((node("n1", cpus=5),), (pool("a", "cloud-a"),))  # room for one
    plan = place(snap, pods("web", 2), {"web": pol})
    assert [b.node for b in plan.bindings] == ["n1"]
    assert "waits until its max" in plan.pending[0].reason


def test_timeout_rule_moves_to_the_next_unit_after_the_timeout() -> None:
    pol = ResourcePolicy(
        (Unit(NodeKind.OWNED), Unit(NodeKind.VIRTUAL)),
        next_unit_when=NextUnitWhen.TIMEOUT_OR_EXCEED_MAX,
        timeout_s=30,
    )
    full = ClusterSnapshot((node("n1", cpus=1),), (pool("a", "cloud-a"),), now_s=100.0)
    young = Pod("web-0", "web", R2C4G, pending_since_s=90.0)
    old = Pod("web-1", "web", R2C4G, pending_since_s=50.0)
    plan = place(full, [young, old], {"web": pol})
    assert [b.pod for b in plan.bindings] == ["web-1"]
    assert plan.pending[0].pod == "web-0" and "waited 10s" in plan.pending[0].reason


def test_scale_in_removes_virtual_newest_first_then_owned() -> None:
    snap0 = ClusterSnapshot((node("n1"),), (pool("a", "cloud-a"),))
    pol = ResourcePolicy.hybrid(2, ["a"])
    plan = place(snap0, pods("web", 4), {"web": pol})
    placed = tuple(
        Pod(b.pod, "web", R2C4G, node=b.node, spec=b.spec, created_s=float(i))
        for i, b in enumerate(plan.bindings)
    )
    snap = ClusterSnapshot(snap0.owned, snap0.pools, placed)
    victims = [p.name for p in scale_in(snap, "web", 3, pol)]
    assert victims == ["web-3", "web-2", "web-1"]
    costs = deletion_costs(snap, "web", pol)
    assert costs["web-3"] < costs["web-2"] < 0 < costs["web-1"] < costs["web-0"]
    assert DELETION_COST_ANNOTATION == "controller.kubernetes.io/pod-deletion-cost"


def test_cordoned_pool_pods_drain_first() -> None:
    pods_ = (
        Pod("a-new", "web", R2C4G, node=NodeName("vk-a"), created_s=9),
        Pod("b-old", "web", R2C4G, node=NodeName("vk-b"), created_s=1),
        Pod("owned", "web", R2C4G, node=NodeName("n1"), created_s=0),
    )
    snap = ClusterSnapshot((node("n1"),), (pool("a", "cloud-a"), pool("b", "cloud-b")), pods_)
    snap = cordon(snap, pool="b")
    assert [p.name for p in scale_in(snap, "web", 3)] == ["b-old", "a-new", "owned"]


def test_resources_parse_and_validation() -> None:
    assert Resources.parse("2c4g") == Resources(2000, 4096)
    assert Resources.parse("0.5c512m") == Resources(500, 512)
    assert str(Resources(2000, 4096)) == "2c4g"
    with pytest.raises(ConfigError, match="cannot parse resources"):
        Resources.parse("lots")
    with pytest.raises(ConfigError, match="grow monotonically"):
        VirtualPool("x", NodeName("vk"), "s", (SPECS[2], SPECS[0]))
