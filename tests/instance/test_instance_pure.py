"""Pure tests: instance spec parsing, the type catalogue, capacity fallback, limit builders,
pod-member bundles and records (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.config import load_section
from tidal.engine.bundle import BundleInputs, build_config
from tidal.engine.runtime import RuncRuntime
from tidal.engine.spec import ContainerSpec, PortMapping
from tidal.errors import ConfigError, NoCapacityError
from tidal.ids import InstanceId
from tidal.instance.capacity import Capacity, choose, shortfall
from tidal.instance.catalog import EMBEDDED_TYPES, Catalog, InstanceSettings
from tidal.instance.limits import blkio_lines, cgroup_files, net_plan, tbf_burst_bytes
from tidal.instance.spec import (
    InstanceSpec,
    InstanceType,
    Limits,
    MemberSpec,
    parse_member,
    parse_rate,
    parse_spec_list,
)
from tidal.instance.store import InstanceRecord, InstanceStore
from tidal.units import GiB, MiB

# --- spec parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "image", "command"),
    [
        ("side=/srv/busybox", "/srv/busybox", ()),
        ("side=/srv/busybox:sleep 1000", "/srv/busybox", ("sleep", "1000")),
        ("side=/srv/busybox:/bin/top", "/srv/busybox", ("/bin/top",)),
        ("db=127.0.0.1:5000/team/db:v1", "127.0.0.1:5000/team/db:v1", ()),
        ("db=127.0.0.1:5000/db:v1:redis-server --port 7000", "127.0.0.1:5000/db:v1",
         ("redis-server", "--port", "7000")),
        ("w=/img:sh -c 'echo a b'", "/img", ("sh", "-c", "echo a b")),
    ],
)  # fmt: skip
def test_parse_member_splits_image_and_command(
    text: str, image: str, command: tuple[str, ...]
) -> None:
    m = parse_member(text)
    assert (m.image, m.command) == (image, command)


def test_parse_member_restart_policy() -> None:
    m = parse_member("side:on-failure=/img:sh -c 'exit 3'")
    assert (m.name, m.restart, m.command) == ("side", "on-failure", ("sh", "-c", "exit 3"))
    assert parse_member("side=/img").restart == "no"
    with pytest.raises(ConfigError, match="unknown restart policy 'sometimes'"):
        parse_member("side:sometimes=/img")


@pytest.mark.parametrize("bad", ["side", "=img", "side=", "bad name=/img", "x=/img:sh -c 'open"])
def test_parse_member_rejects_bad_text_in_one_line(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_member(bad)
    assert "\n" not in str(info.value)


def test_rates_are_bits_per_second_with_si_multiples() -> None:
    assert parse_rate("5M") == 5_000_000
    assert parse_rate("100k") == 100_000
    assert parse_rate("2.5mbit") == 2_500_000
    assert parse_rate("1G") == 1_000_000_000
    with pytest.raises(ConfigError, match="--bandwidth 'fast'"):
        parse_rate("fast")
    with pytest.raises(ConfigError):
        parse_rate("0")


def test_spec_list_and_names() -> None:
    assert parse_spec_list("2c2g,2c4g, 4c8g") == ("2c2g", "2c4g", "4c8g")
    assert parse_spec_list(None) == ()
    with pytest.raises(ConfigError):
        parse_spec_list("2c2g,,4c8g")
    with pytest.raises(ConfigError, match="'main' and 'sandbox' are taken"):
        InstanceSpec(image="/img", members=(MemberSpec("main", "/img"),))
    with pytest.raises(ConfigError, match="share a name"):
        InstanceSpec(image="/img", members=(MemberSpec("a", "/i"), MemberSpec("a", "/j")))
    with pytest.raises(ConfigError, match="unknown runtime 'crun' for an instance"):
        InstanceSpec(image="/img", runtime="crun")


def test_instance_spec_round_trips_through_json() -> None:
    spec = InstanceSpec(
        image="/img",
        command=("httpd", "-f"),
        name="web",
        members=(MemberSpec("side", "/img2", ("sleep", "9"), (("A", "1"),), "always"),),
        specs=("2c2g", "2c4g"),
        limits=Limits(egress_bps=5_000_000, memory_bytes=512 * MiB),
        ports=(PortMapping(8080, 80),),
        env=(("K", "V"),),
        labels=(("app", "web"),),
        remove_on_exit=True,
        pull="missing",
    )
    assert InstanceSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="unknown field"):
        InstanceSpec.from_json({**spec.to_json(), "colour": "red"})


def test_limits_over_and_validation() -> None:
    base = EMBEDDED_TYPES["2c4g"]
    merged = Limits(egress_bps=5_000_000).over(base)
    assert merged.egress_bps == 5_000_000
    assert merged.cpus == 2 and merged.memory_bytes == 4 * GiB
    with pytest.raises(ConfigError, match="cpus must be positive"):
        Limits(cpus=0)
    with pytest.raises(ConfigError, match="below 8 MiB"):
        Limits(memory_bytes=1024)


# --- catalogue -----------------------------------------------------------------------------


def test_unknown_spec_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        Catalog().resolve(("2c4g", "3c7g"))
    msg = str(info.value)
    assert "unknown instance spec '3c7g'" in msg and "2c4g" in msg and "\n" not in msg


def test_settings_file_adds_and_replaces_types(tmp_path: Path) -> None:
    cfg = tmp_path / "tidal.toml"
    cfg.write_text(
        "[instance]\ncapacity_cpus = 3\n"
        "[instance.types.tiny]\ncpus = 0.25\nmemory_bytes = 67108864\negress_bps = 1000000\n"
        "[instance.types.2c4g]\ncpus = 2\nmemory_bytes = 4294967296\npids = 64\n"
    )
    settings = load_section("instance", InstanceSettings, path=cfg, env={})
    cat = Catalog(settings)
    assert settings.capacity_cpus == 3
    assert cat.get("tiny").limits == Limits(cpus=0.25, memory_bytes=64 * MiB, egress_bps=10**6)
    assert cat.get("2c4g").limits.pids == 64 and cat.get("2c4g").limits.egress_bps is None
    assert cat.get("1c1g").limits == EMBEDDED_TYPES["1c1g"]


def test_settings_file_bad_key_names_it(tmp_path: Path) -> None:
    cfg = tmp_path / "tidal.toml"
    cfg.write_text("[instance.types.tiny]\ncpu = 1\n")
    with pytest.raises(ConfigError, match="cpu"):
        load_section("instance", InstanceSettings, path=cfg, env={})


# --- capacity fallback ---------------------------------------------------------------------


def _types(*names: str) -> list[InstanceType]:
    return [InstanceType(n, EMBEDDED_TYPES[n]) for n in names]


def test_fallback_takes_the_first_spec_that_fits() -> None:
    cap = Capacity(4, 8 * GiB)
    got = choose(_types("4c8g", "2c4g", "2c2g"), Limits(), cap, Capacity(1, 1 * GiB))
    assert got.type is not None and got.type.name == "2c4g"
    assert got.limits == EMBEDDED_TYPES["2c4g"]


def test_fallback_with_no_fit_names_what_is_short_for_each() -> None:
    with pytest.raises(NoCapacityError) as info:
        choose(_types("2c2g", "4c8g"), Limits(), Capacity(2, 8 * GiB), Capacity(1, 7 * GiB))
    msg = str(info.value)
    assert msg.startswith("no instance spec fits the node's free capacity")
    assert "2c2g needs 2 CPUs (free 1)" in msg
    assert "4c8g needs 4 CPUs (free 1) and 8.0 GiB memory (free 1.0 GiB)" in msg
    assert "\n" not in msg


def test_adhoc_values_are_laid_over_each_candidate_before_the_check() -> None:
    cap = Capacity(2, 8 * GiB)
    got = choose(_types("2c4g"), Limits(cpus=1), cap, Capacity(1, 0))
    assert got.limits.cpus == 1 and got.limits.memory_bytes == 4 * GiB
    assert choose([], Limits(), cap, Capacity(2, 8 * GiB)).type is None
    with pytest.raises(NoCapacityError, match="needs 3 CPUs"):
        choose([], Limits(cpus=3), cap, Capacity(0, 0))


@given(
    st.lists(st.sampled_from(sorted(EMBEDDED_TYPES)), min_size=1, max_size=5),
    st.floats(0, 16),
    st.integers(0, 64).map(lambda g: g * GiB),
)
def test_choice_is_the_first_fitting_candidate(names: list[str], cpus: float, mem: int) -> None:
    """Against a model: the choice fits, and every earlier candidate did not."""
    cands = _types(*names)
    free = Capacity(cpus, mem)
    fits = [c for c in cands if not shortfall(Capacity.of(c.limits), free)]
    try:
        got = choose(cands, Limits(), free, Capacity(0, 0))
    except NoCapacityError:
        assert not fits
        return
    assert got.type == fits[0]


# --- limit builders ------------------------------------------------------------------------


def test_cgroup_files_v1_and_v2() -> None:
    lim = Limits(cpus=0.5, memory_bytes=256 * MiB, pids=64)
    assert ("cpu", "cpu.cfs_quota_us", "50000") in cgroup_files(lim, v2=False)
    assert ("memory", "memory.limit_in_bytes", str(256 * MiB)) in cgroup_files(lim, v2=False)
    assert ("pids", "pids.max", "64") in cgroup_files(lim, v2=False)
    assert ("", "cpu.max", "50000 100000") in cgroup_files(lim, v2=True)
    assert cgroup_files(Limits(), v2=False) == []


def test_blkio_lines_per_device() -> None:
    lim = Limits(disk_write_bps=10 * MiB, disk_read_iops=100)
    v1 = blkio_lines(lim, [(7, 3), (254, 0), (7, 3)], v2=False)
    assert v1 == [
        ("blkio.throttle.write_bps_device", f"7:3 {10 * MiB}"),
        ("blkio.throttle.read_iops_device", "7:3 100"),
        ("blkio.throttle.write_bps_device", f"254:0 {10 * MiB}"),
        ("blkio.throttle.read_iops_device", "254:0 100"),
    ]
    assert blkio_lines(lim, [(7, 3)], v2=True) == [("io.max", f"7:3 wbps={10 * MiB} riops=100")]


def test_net_plan_shapes_each_direction_on_its_own_end() -> None:
    plan = net_plan(Limits(ingress_bps=5_000_000, egress_bps=1_000_000), "tvabc")
    assert plan.host == (
        f"qdisc replace dev tvabc root tbf rate 5000000bit burst {tbf_burst_bytes(5_000_000)} latency 50ms",
    )
    assert plan.pod[0].startswith("qdisc replace dev eth0 root tbf rate 1000000bit")
    assert net_plan(Limits(), "tvabc") == net_plan(Limits(cpus=1), "tvabc")
    assert net_plan(Limits(), "tvabc").host == ()


# --- pod members in the engine's bundle ----------------------------------------------------


def _inputs(**kw: object) -> BundleInputs:
    base: dict[str, object] = {
        "container_id": "c" * 64,
        "rootfs": "/r",
        "args": ("sh",),
        "cgroups_path": "/tidal/pod-1/x",
    }
    base.update(kw)
    return BundleInputs(**base)  # type: ignore[arg-type]


def test_pod_member_joins_the_sandbox_namespaces_by_path() -> None:
    spec = ContainerSpec(
        image="/img", name="web.main", sandbox="s" * 64, cgroup_parent="tidal/pod-1"
    )
    cfg = build_config(
        spec,
        _inputs(
            netns_path="/var/run/netns/tidal-sss",
            ipc_ns_path="/proc/42/ns/ipc",
            uts_ns_path="/proc/42/ns/uts",
            annotations=(("io.example/pod", "1"),),
        ),
    )
    ns = {n["type"]: n.get("path") for n in cfg["linux"]["namespaces"]}
    assert ns == {
        "pid": None,
        "ipc": "/proc/42/ns/ipc",
        "uts": "/proc/42/ns/uts",
        "mount": None,
        "network": "/var/run/netns/tidal-sss",
    }
    assert "hostname" not in cfg  # the joined UTS namespace has the pod's
    assert cfg["annotations"]["io.example/pod"] == "1"
    assert cfg["linux"]["cgroupsPath"] == "/tidal/pod-1/x"


def test_container_of_its_own_keeps_private_namespaces() -> None:
    cfg = build_config(ContainerSpec(image="/img", name="solo"), _inputs())
    assert all("path" not in n for n in cfg["linux"]["namespaces"])
    assert cfg["hostname"] == "solo"


def test_pod_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="takes its network from its sandbox"):
        ContainerSpec(image="/img", sandbox="s", network="bridge")
    with pytest.raises(ConfigError, match="cgroup parent"):
        ContainerSpec(image="/img", cgroup_parent="/abs/../x")
    spec = ContainerSpec(image="/img", sandbox="s", cgroup_parent="tidal/pod-1")
    assert ContainerSpec.from_json(spec.to_json()) == spec


def test_runc_needs_no_pod_annotations(tmp_path: Path) -> None:
    rt = RuncRuntime.__new__(RuncRuntime)
    assert rt.pod_annotations("s" * 64, is_sandbox=True) == {}
    assert RuncRuntime.capabilities.pod_sandbox is False


# --- records -------------------------------------------------------------------------------


def test_record_round_trip_and_lookup(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    rec = InstanceRecord(
        id=InstanceId("ab" * 16),
        name="web",
        spec=InstanceSpec(image="/img", members=(MemberSpec("side", "/img"),)),
        phase="creating",
        runtime="runc",
        cgroup="tidal/pod-abab",
        created_at=1.0,
        chosen=InstanceType("2c4g", EMBEDDED_TYPES["2c4g"]),
        limits=EMBEDDED_TYPES["2c4g"],
    )
    store.put(rec)
    assert store.get("web") == rec == store.get("abab")
    assert rec.member_names() == ("sandbox", "main", "side")
    assert rec.container_name("side") == "web.side"
    store.put(rec.replace(phase="running", ip="10.0.0.2"))
    assert store.get("web").phase == "running"
    store.delete(rec.id)
    with pytest.raises(FileNotFoundError, match="no instance 'web'"):
        store.get("web")
