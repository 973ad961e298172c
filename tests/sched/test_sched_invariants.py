"""Scheduler invariants under random clusters, checked against the plan itself (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

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
    NextUnitWhen,
    ResourcePolicy,
    Strategy,
    Unit,
    deletion_costs,
    place,
    unit_of,
)

SPECS = (
    VirtualSpec.of("1c2g", 0.75),
    VirtualSpec.of("2c4g", 1.5),
    VirtualSpec.of("4c8g", 3.0),
    VirtualSpec.of("8c16g", 6.0),
)
REQUESTS = st.sampled_from(
    [
        Resources(500, 1024),
        Resources(1000, 2048),
        Resources(2000, 4096),
        Resources(3000, 6000),
        Resources(4000, 8192),
    ]
)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterSnapshot, list[Pod], dict[str, ResourcePolicy]]:
    n_nodes = draw(st.integers(0, 8))
    owned = tuple(
        OwnedNode(
            NodeName(f"n{i}"),
            Resources(draw(st.integers(1, 16)) * 1000, draw(st.integers(1, 64)) * 1024),
            draw(st.sampled_from([0.5, 0.6, 0.8, 1.0])),
            {"zone": draw(st.sampled_from(["z1", "z2"]))},
            cordoned=draw(st.booleans()) and draw(st.booleans()),
        )
        for i in range(n_nodes)
    )
    pools = tuple(
        VirtualPool(
            f"p{i}",
            NodeName(f"vk-{i}"),
            f"site{i % 2}",
            SPECS,
            {s.name: draw(st.integers(0, 4)) for s in SPECS if draw(st.booleans())},
            cordoned=draw(st.booleans()) and draw(st.booleans()),
        )
        for i in range(draw(st.integers(0, 3)))
    )
    failed = frozenset(draw(st.sets(st.sampled_from(["site0", "site1"]), max_size=1)))
    services = ["a", "b", "c"]
    policies = {}
    for svc in services:
        units = [
            Unit(
                NodeKind.OWNED,
                draw(st.sampled_from([{}, {"zone": "z1"}])),
                max=draw(st.one_of(st.none(), st.integers(0, 6))),
            )
        ]
        if pools and draw(st.booleans()):
            units.append(
                Unit(
                    NodeKind.VIRTUAL,
                    max=draw(st.one_of(st.none(), st.integers(0, 6))),
                    pools=tuple(p.name for p in pools[: draw(st.integers(1, len(pools)))]),
                )
            )
        policies[svc] = ResourcePolicy(
            tuple(units),
            strategy=draw(st.sampled_from(list(Strategy))),
            next_unit_when=draw(st.sampled_from(list(NextUnitWhen))),
            timeout_s=30,
            anti_affinity=draw(st.booleans()),
        )
    pods = [
        Pod(
            f"{svc}-{i}",
            svc,
            draw(REQUESTS),
            created_s=float(i),
            pending_since_s=draw(st.sampled_from([None, 0.0, 95.0])),
        )
        for svc in services
        for i in range(draw(st.integers(0, 12)))
    ]
    snap = ClusterSnapshot(owned, pools, now_s=100.0, failed_sites=failed)
    return snap, pods, policies


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_placement_invariants(
    case: tuple[ClusterSnapshot, list[Pod], dict[str, ResourcePolicy]],
) -> None:
    snap, pods, policies = case
    plan = place(snap, pods, policies)
    by_name = {p.name: p for p in pods}
    # every pod is either bound or pending, once
    assert sorted([b.pod for b in plan.bindings] + [p.pod for p in plan.pending]) == sorted(by_name)
    owned = {n.name: n for n in snap.owned}
    pools = {p.node_name: p for p in snap.pools}
    used: dict[str, Resources] = {}
    per_unit: Counter[tuple[str, int]] = Counter()
    stock_used: Counter[tuple[str, str]] = Counter()
    for b in plan.bindings:
        pod = by_name[b.pod]
        pol = policies[pod.service]
        if b.kind is NodeKind.OWNED:
            n = owned[b.node]
            assert not n.cordoned
            used[b.node] = used.get(b.node, Resources()) + pod.requests
            # never above the utilisation ceiling
            assert used[b.node].fits_in(n.allocatable)
        else:
            pool = pools[b.node]
            assert snap.usable(pool), "placed on a cordoned pool or failed site"
            spec = {s.name: s for s in pool.specs}[b.spec or ""]
            requested = {s.name: s for s in pool.specs}[b.requested_spec or ""]
            # upgrades never to a smaller spec, and the spec holds the pod
            assert requested.resources.fits_in(spec.resources)
            assert pod.requests.fits_in(spec.resources)
            stock_used[(pool.name, spec.name)] += 1
        if b.unit is None:
            assert pol.strategy is Strategy.PREFER, "required policies stay inside their units"
        else:
            unit = pol.units[b.unit]
            assert unit.kind is b.kind
            assert unit_of(snap, pol, b.node) is not None
            per_unit[(pod.service, b.unit)] += 1
            if unit.max is not None:
                assert per_unit[(pod.service, b.unit)] <= unit.max
    for (pool_name, spec_name), n_used in stock_used.items():
        pool = next(p for p in snap.pools if p.name == pool_name)
        left = pool.stock_of(spec_name)
        assert left is None or n_used <= left
    # anti-affinity: one replica of a service per owned node
    for svc, pol in policies.items():
        if pol.anti_affinity:
            nodes = [b.node for b in plan.bindings if b.service == svc and b.kind is NodeKind.OWNED]
            assert len(nodes) == len(set(nodes))


@settings(max_examples=100, deadline=None)
@given(clusters())
def test_deletion_costs_order_virtual_before_owned(
    case: tuple[ClusterSnapshot, list[Pod], dict[str, ResourcePolicy]],
) -> None:
    snap, pods, policies = case
    plan = place(snap, pods, policies)
    placed = tuple(
        Pod(b.pod, b.service, Resources(), node=b.node, created_s=float(i))
        for i, b in enumerate(plan.bindings)
    )
    snap = ClusterSnapshot(snap.owned, snap.pools, placed, failed_sites=snap.failed_sites)
    for svc in policies:
        costs = deletion_costs(snap, svc, policies[svc])
        mine = [p for p in placed if p.service == svc]
        assert set(costs) == {p.name for p in mine}
        assert len(set(costs.values())) == len(costs), "costs are a strict order"
        virtual = [costs[p.name] for p in mine if p.node and snap.pool_of(p.node)]
        owned_ = [costs[p.name] for p in mine if p.node and not snap.pool_of(p.node)]
        if virtual and owned_:
            assert max(virtual) < min(owned_)
        assert all(c < 0 for c in virtual) and all(c > 0 for c in owned_)
        assert all(-(2**31) <= c < 2**31 for c in costs.values())


@settings(max_examples=80, deadline=None)
@given(clusters(), st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=12))
def test_bound_pods_count_and_the_snapshot_index_is_not_mutated(
    case: tuple[ClusterSnapshot, list[Pod], dict[str, ResourcePolicy]], gpus: list[int]
) -> None:
    """Place half, bind it into the snapshot, place the rest: owned nodes never exceed their
    ceiling on any resource (GPUs included) counting the bound pods, unit max counts them, and
    placing twice on one snapshot (its index cached) gives the same plan."""
    import dataclasses

    snap, pods, policies = case
    owned = tuple(
        dataclasses.replace(n, capacity=Resources(n.capacity.cpu_milli, n.capacity.memory_mib, 2))
        for n in snap.owned
    )
    pods = [
        dataclasses.replace(p, requests=dataclasses.replace(p.requests, gpu=gpus[i % len(gpus)]))
        for i, p in enumerate(pods)
    ]
    snap = dataclasses.replace(snap, owned=owned)
    first, rest = pods[: len(pods) // 2], pods[len(pods) // 2 :]
    plan1 = place(snap, first, policies)
    by_name = {p.name: p for p in pods}
    bound = tuple(
        dataclasses.replace(by_name[b.pod], node=b.node, spec=b.spec) for b in plan1.bindings
    )
    snap2 = dataclasses.replace(snap, pods=bound)
    plan2 = place(snap2, rest, policies)
    assert place(snap2, rest, policies) == plan2  # the cached index was not changed
    used: dict[str, Resources] = {}
    per_unit: Counter[tuple[str, int]] = Counter()
    for b in (*plan1.bindings, *plan2.bindings):
        if b.kind is NodeKind.OWNED:
            used[b.node] = used.get(b.node, Resources()) + by_name[b.pod].requests
        if b.unit is not None:
            per_unit[(b.service, b.unit)] += 1
            limit = policies[b.service].units[b.unit].max
            assert limit is None or per_unit[(b.service, b.unit)] <= limit
    nodes = {n.name: n for n in owned}
    for name, total in used.items():
        assert total.fits_in(nodes[NodeName(name)].allocatable)
