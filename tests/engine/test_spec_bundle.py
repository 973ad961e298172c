"""Pure tests: spec parsing/validation and the OCI config builder (no root needed)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tidal.engine.bundle import (
    CPU_PERIOD_US,
    INIT_DIR,
    BundleInputs,
    build_config,
    cpuset_for,
    init_conf,
    resources_from,
    rich_args,
)
from tidal.engine.spec import (
    ContainerSpec,
    HookSpec,
    PortMapping,
    ServiceSpec,
    VolumeSpec,
    parse_disk_quota,
    parse_env,
    parse_hook,
    parse_labels,
    parse_port,
    parse_service,
    parse_volume,
)
from tidal.errors import ConfigError, QuotaError


def inputs(**kw: object) -> BundleInputs:
    base: dict[str, object] = {
        "container_id": "c" * 64,
        "rootfs": "/r",
        "args": ("sh",),
        "cgroups_path": "/tidal/x",
    }
    base.update(kw)
    return BundleInputs(**base)  # type: ignore[arg-type]


def test_resources_cpu_memory_pids() -> None:
    res = resources_from(1.5, 512 << 20, 100)
    assert res["cpu"]["quota"] == int(1.5 * CPU_PERIOD_US)
    assert res["cpu"]["period"] == CPU_PERIOD_US
    assert res["cpu"]["shares"] == 1536
    assert res["memory"] == {"limit": 512 << 20, "swap": 512 << 20}
    assert res["pids"] == {"limit": 100}
    assert resources_from(None, None, None) == {}


def test_config_has_runtime_spec_shape() -> None:
    spec = ContainerSpec(
        image="/img", command=("echo", "hi"), env=(("A", "1"),), cpus=0.5, name="web"
    )
    cfg = build_config(spec, inputs(args=("echo", "hi")))
    assert cfg["ociVersion"].startswith("1.0")
    assert cfg["process"]["args"] == ["echo", "hi"]
    assert "A=1" in cfg["process"]["env"]
    assert any(e.startswith("PATH=") for e in cfg["process"]["env"])
    assert cfg["root"] == {"path": "/r", "readonly": False}
    assert cfg["hostname"] == "web"
    assert cfg["linux"]["cgroupsPath"] == "/tidal/x"
    assert cfg["linux"]["resources"]["cpu"]["quota"] == 50_000
    types = [n["type"] for n in cfg["linux"]["namespaces"]]
    assert set(types) == {"pid", "ipc", "uts", "mount", "network"}
    dests = [m["destination"] for m in cfg["mounts"]]
    assert {"/proc", "/dev", "/sys"} <= set(dests)
    assert "hooks" not in cfg


def test_network_modes() -> None:
    host = build_config(ContainerSpec(image="/i", network="host"), inputs())
    assert "network" not in [n["type"] for n in host["linux"]["namespaces"]]
    bridge = build_config(
        ContainerSpec(image="/i", network="bridge"), inputs(netns_path="/run/netns/x")
    )
    assert {"type": "network", "path": "/run/netns/x"} in bridge["linux"]["namespaces"]


def test_lxcfs_and_volume_mounts() -> None:
    from tidal.engine.bundle import bind

    cfg = build_config(
        ContainerSpec(image="/i"),
        inputs(
            lxcfs_proc_dir="/lx/proc",
            lxcfs_files=("meminfo", "uptime"),
            mounts=(bind("/host/data", "/data", readonly=True),),
        ),
    )
    by_dest = {m["destination"]: m for m in cfg["mounts"]}
    assert by_dest["/proc/meminfo"]["source"] == "/lx/proc/meminfo"
    assert "ro" in by_dest["/proc/meminfo"]["options"]
    assert "/proc/cpuinfo" not in by_dest
    assert by_dest["/data"]["source"] == "/host/data"
    # lxcfs binds come after /proc itself, or the proc mount would hide them
    dests = [m["destination"] for m in cfg["mounts"]]
    assert dests.index("/proc") < dests.index("/proc/meminfo")


def test_hooks_in_config() -> None:
    spec = ContainerSpec(
        image="/i",
        prestart_hooks=(HookSpec("/bin/pre", ("pre", "x")),),
        poststop_hooks=(HookSpec("/bin/post", (), 5),),
    )
    cfg = build_config(spec, inputs())
    assert cfg["hooks"]["prestart"] == [{"path": "/bin/pre", "args": ["pre", "x"]}]
    assert cfg["hooks"]["poststop"] == [{"path": "/bin/post", "args": ["/bin/post"], "timeout": 5}]


def test_rich_mode_init_conf_and_args() -> None:
    spec = ContainerSpec(
        image="/i",
        rich=True,
        restart="on-failure",
        initscript="/etc/init.sh",
        services=(ServiceSpec("cron", ("crond", "-f"), "always", 3),),
    )
    conf = init_conf(spec, ("app", "--port", "80"))
    lines = conf.splitlines()
    assert lines[0] == "initscript\t/etc/init.sh"
    assert lines[1] == "main\ton-failure\t10\tapp\t--port\t80"
    assert lines[2] == "service\tcron\talways\t3\tcrond\t-f"
    assert rich_args(spec, ("app",)) == (f"{INIT_DIR}/init", f"{INIT_DIR}/init.conf")
    cfg = build_config(spec, inputs(init_dir="/host/init"))
    assert {
        "destination": INIT_DIR,
        "type": "bind",
        "source": "/host/init",
        "options": ["rbind", "ro"],
    } in cfg["mounts"]
    dests = [m["destination"] for m in cfg["mounts"]]  # the state dir is bound after /.tidal
    assert dests.index(f"{INIT_DIR}/state") > dests.index(INIT_DIR)
    assert cfg["mounts"][dests.index(f"{INIT_DIR}/state")]["options"] == ["rbind", "rw"]
    assert "CAP_SYS_ADMIN" in cfg["process"]["capabilities"]["bounding"]
    plain = build_config(ContainerSpec(image="/i"), inputs())
    assert "CAP_SYS_ADMIN" not in plain["process"]["capabilities"]["bounding"]


def test_spec_json_round_trip() -> None:
    spec = ContainerSpec(
        image="/i",
        command=("a", "b"),
        name="n1",
        env=(("K", "V"),),
        volumes=(VolumeSpec("/data"), VolumeSpec("/etc/x", "/host", True)),
        disk_quotas=parse_disk_quota(".*=1G", ["/data"], 16384),
        network="bridge",
        ports=(PortMapping(8080, 80),),
        rich=True,
        services=(ServiceSpec("s", ("x",)),),
        poststop_hooks=(HookSpec("/bin/true"),),
    )
    assert ContainerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="unknown field"):
        ContainerSpec.from_json({**spec.to_json(), "bogus": 1})


def test_parsers() -> None:
    assert parse_env(["A=1", "B=x=y"]) == (("A", "1"), ("B", "x=y"))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_env(["NOVALUE"])
    assert parse_labels(["priority=online", "tidal.io/app=a=b"]) == (
        ("priority", "online"),
        ("tidal.io/app", "a=b"),
    )
    with pytest.raises(ConfigError, match="given twice"):
        parse_labels(["a=1", "a=2"])
    with pytest.raises(ConfigError, match=r"--label '=x'"):
        parse_labels(["=x"])
    assert parse_volume("/data") == VolumeSpec("/data")
    assert parse_volume("/h:/c:ro") == VolumeSpec("/c", "/h", True)
    with pytest.raises(ConfigError, match="absolute"):
        parse_volume("rel:/c")
    assert parse_port("8080:80") == PortMapping(8080, 80)
    assert parse_port("127.0.0.1:8080:80").host_ip == "127.0.0.1"
    with pytest.raises(ConfigError, match="out of range"):
        parse_port("70000:80")
    assert parse_service("cron:on-failure=crond -f") == ServiceSpec(
        "cron", ("crond", "-f"), "on-failure"
    )
    assert parse_hook("/bin/echo hi").args == ("/bin/echo", "hi")


def test_cpuset_follows_the_cpus_limit() -> None:
    assert cpuset_for(1.0, (0, 1), "00000000") == "0"
    assert cpuset_for(1.0, (0, 1), "00000001") == "1"  # spread by container id
    assert cpuset_for(0.5, (0, 1), "0" * 8) == "0"  # a fraction still needs one CPU
    assert cpuset_for(1.5, (0, 2, 4, 6), "00000003") == "0,6"  # consecutive, wrapping
    assert cpuset_for(2.0, (0, 1), "0" * 8) is None  # covers the host: no pinning
    assert cpuset_for(None, (0, 1), "0" * 8) is None
    assert cpuset_for(1.0, (), "0" * 8) is None
    cfg = build_config(ContainerSpec(image="/i", cpus=1), inputs(host_cpus=(0, 1)))
    assert cfg["linux"]["resources"]["cpu"]["cpus"] in ("0", "1")
    assert cfg["linux"]["resources"]["cpu"]["quota"] == CPU_PERIOD_US
    plain = build_config(ContainerSpec(image="/i"), inputs(host_cpus=(0, 1)))
    assert "cpu" not in plain["linux"]["resources"]


def test_service_and_hook_commands_split_with_shell_rules() -> None:
    svc = parse_service("""web=sh -c 'echo "a  b" > /tmp/x; sleep 1'""")
    assert svc.argv == ("sh", "-c", 'echo "a  b" > /tmp/x; sleep 1')
    assert parse_service(r"x=printf %s\ y").argv == ("printf", "%s y")
    hook = parse_hook("/bin/sh -c 'cat > /run/state.json'")
    assert (hook.path, hook.args) == ("/bin/sh", ("/bin/sh", "-c", "cat > /run/state.json"))
    with pytest.raises(ConfigError, match=r"--service .*no closing quotation"):
        parse_service("web=sh -c 'echo")
    with pytest.raises(ConfigError, match=r"hook .*no closing quotation"):
        parse_hook('/bin/sh -c "x')
    with pytest.raises(ConfigError, match="expected NAME"):
        parse_service("web=''")
    assert parse_service("w:on-failure:3=true").max_restarts == 3
    assert parse_service("w=true").max_restarts == 10
    with pytest.raises(ConfigError, match="MAX restarts 'x'"):
        parse_service("w:always:x=true")


def test_disk_quota_forms() -> None:
    (root,) = parse_disk_quota("1G", [], 16384)
    assert (root.target, root.size_bytes, root.inodes) == ("/", 1 << 30, (1 << 30) // 16384)
    (data,) = parse_disk_quota("/data=10G,inodes=5000", ["/data"], 16384)
    assert (data.target, data.inodes) == ("/data", 5000)
    every = parse_disk_quota(".*=100M", ["/a", "/b"], 16384)
    assert [q.target for q in every] == ["/", "/a", "/b"]
    with pytest.raises(QuotaError, match="16M"):
        parse_disk_quota("1M", [], 16384)
    with pytest.raises(QuotaError, match="inodes=N"):
        parse_disk_quota("1G,blocks=3", [], 16384)


def test_validation_messages() -> None:
    with pytest.raises(ConfigError, match="--network bridge"):
        ContainerSpec(image="/i", ports=(PortMapping(1, 2),))
    with pytest.raises(ConfigError, match="rich mode"):
        ContainerSpec(image="/i", services=(ServiceSpec("s", ("x",)),))
    with pytest.raises(ConfigError, match="unknown runtime"):
        ContainerSpec(image="/i", runtime="kata")
    with pytest.raises(QuotaError, match="no volume is mounted"):
        ContainerSpec(image="/i", disk_quotas=parse_disk_quota("/data=1G", ["/data"], 16384))
    with pytest.raises(QuotaError, match="bind mount"):
        ContainerSpec(
            image="/i",
            volumes=(VolumeSpec("/data", "/srv"),),
            disk_quotas=parse_disk_quota("/data=1G", ["/data"], 16384),
        )
    with pytest.raises(ConfigError, match="name"):
        ContainerSpec(image="/i", name="bad name!")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": "docker"}, "runtime 'docker': choose one of runc, crun"),
        ({"lxcfs": "maybe"}, "lxcfs 'maybe'"),
        ({"subnet": "10.0.0.0/33"}, "subnet '10.0.0.0/33'"),
        ({"subnet": "fd00::/64"}, "IPv4"),
        ({"bridge": "a-very-long-bridge-name"}, "1-15 characters"),
        ({"cgroup_parent": "/abs/../x"}, "cgroup_parent"),
        ({"stop_timeout_s": -1.0}, "must not be negative"),
    ],
)
def test_engine_settings_are_checked_at_load(changes: dict[str, object], message: str) -> None:
    from tidal.engine.settings import EngineSettings

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        EngineSettings(**changes)  # type: ignore[arg-type]
    assert str(info.value).startswith("[engine]")


def test_pinning_only_where_a_cpuset_controller_exists(tmp_path: Path) -> None:
    from tidal.engine.assemble import host_cpus

    mine = tuple(sorted(os.sched_getaffinity(0)))
    v1, v2, none = tmp_path / "v1", tmp_path / "v2", tmp_path / "none"
    (v1 / "cpuset").mkdir(parents=True)
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids cpuset\n")
    none.mkdir()
    (none / "cgroup.controllers").write_text("cpu memory\n")
    assert host_cpus(v1) == mine and host_cpus(v2) == mine
    assert host_cpus(none) == () and host_cpus(tmp_path / "missing") == ()
