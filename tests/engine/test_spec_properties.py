"""Property tests: any valid spec survives the JSON trip to the daemon and the database."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidal.engine.bundle import CPU_PERIOD_US, resources_from
from tidal.engine.spec import (
    ContainerSpec,
    HookSpec,
    PortMapping,
    ServiceSpec,
    VolumeSpec,
    parse_disk_quota,
)

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\x00"),
    max_size=20,
)
paths = st.from_regex(r"/[a-z]{1,8}(/[a-z]{1,8}){0,2}", fullmatch=True)


@st.composite
def specs(draw: st.DrawFn) -> ContainerSpec:
    targets = draw(st.lists(paths, max_size=3, unique=True))
    volumes = tuple(VolumeSpec(t, draw(st.none() | paths), draw(st.booleans())) for t in targets)
    engine_vols = [v.target for v in volumes if v.source is None]
    quota_target = draw(st.sampled_from(["/", *engine_vols]))
    quotas = parse_disk_quota(f"{quota_target}={draw(st.integers(16, 4096))}M", engine_vols, 16384)
    rich = draw(st.booleans())
    network = draw(st.sampled_from(["none", "host", "bridge"]))
    ports = (
        tuple(
            PortMapping(p, 80)
            for p in draw(st.lists(st.integers(1, 65535), max_size=2, unique=True))
        )
        if network == "bridge"
        else ()
    )
    return ContainerSpec(
        image=draw(paths),
        command=tuple(draw(st.lists(text, max_size=4))),
        name=draw(st.none() | st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)),
        env=tuple(
            draw(
                st.lists(st.tuples(st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), text), max_size=3)
            )
        ),
        cpus=draw(st.none() | st.floats(0.01, 64)),
        memory_bytes=draw(st.none() | st.integers(4 << 20, 1 << 40)),
        pids_limit=draw(st.none() | st.integers(1, 100000)),
        volumes=volumes,
        disk_quotas=quotas,
        network=network,
        ports=ports,
        runtime=draw(st.sampled_from([None, "runc", "crun"])),
        lxcfs=draw(st.sampled_from([None, True, False])),
        rich=rich,
        services=tuple(
            ServiceSpec(n, ("sleep", "1"))
            for n in draw(st.lists(st.sampled_from("abc"), unique=True))
        )
        if rich
        else (),
        restart=draw(st.sampled_from(["no", "on-failure", "always"])) if rich else "no",
        poststop_hooks=tuple(HookSpec(p, (p, "x")) for p in draw(st.lists(paths, max_size=2))),
    )


@given(specs())
def test_spec_json_round_trip(spec: ContainerSpec) -> None:
    assert ContainerSpec.from_json(spec.to_json()) == spec


@given(st.floats(0.01, 256), st.integers(4 << 20, 1 << 40))
def test_cpu_quota_matches_cpus(cpus: float, memory: int) -> None:
    res = resources_from(cpus, memory, None)
    assert abs(res["cpu"]["quota"] / CPU_PERIOD_US - cpus) <= 0.5 / CPU_PERIOD_US + 1e-12
    assert res["memory"]["limit"] == res["memory"]["swap"] == memory
