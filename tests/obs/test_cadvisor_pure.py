"""The cAdvisor collector's readers, pure: netns counters, block I/O per device, identity."""

from __future__ import annotations

from pathlib import Path

from tidal.cgroups import CgroupV1Fs, CgroupV2Fs, IoStats
from tidal.instance.catalog import InstanceSettings
from tidal.instance.identity import PodIdentity, container_name, cri_log_spec
from tidal.instance.metrics import device_name, parse_net_dev
from tidal.instance.spec import InstanceSpec, Limits
from tidal.instance.store import InstanceRecord

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0:    5826      51    1    2    0     0          0         0     1296      16    3    4    0     0       0          0
"""


def test_net_dev_counters_per_interface_without_loopback() -> None:
    got = parse_net_dev(NET_DEV)
    assert list(got) == ["eth0"]
    assert got["eth0"][:4] == (5826, 51, 1, 2) and got["eth0"][8:12] == (1296, 16, 3, 4)


def test_block_io_per_device_from_v1_blkio_and_v2_io_stat(tmp_path: Path) -> None:
    (tmp_path / "v1" / "cpu" / "pod").mkdir(parents=True)
    blk = tmp_path / "v1" / "blkio" / "pod"
    blk.mkdir(parents=True)
    (blk / "blkio.throttle.io_service_bytes").write_text(
        "7:11 Read 4096\n7:11 Write 8192\n7:11 Sync 0\n7:11 Total 12288\nTotal 12288\n"
    )
    (blk / "blkio.throttle.io_serviced").write_text("7:11 Read 1\n7:11 Write 2\nTotal 3\n")
    assert CgroupV1Fs(tmp_path / "v1").io_stats("/pod") == {"7:11": IoStats(4096, 8192, 1, 2)}
    assert CgroupV1Fs(tmp_path / "v1").io_stats("/other") == {}
    v2 = tmp_path / "v2" / "pod"
    v2.mkdir(parents=True)
    (v2 / "io.stat").write_text("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n")
    assert CgroupV2Fs(tmp_path / "v2").io_stats("/pod") == {"8:0": IoStats(10, 20, 1, 2)}


def test_device_names_come_from_sysfs(tmp_path: Path) -> None:
    (tmp_path / "dev" / "block" / "7:11").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "7:11" / "uevent").write_text(
        "MAJOR=7\nMINOR=11\nDEVNAME=loop11\n"
    )
    assert device_name("7:11", tmp_path) == "/dev/loop11"
    assert device_name("9:9", tmp_path) == "9:9"


def _record(labels: tuple[tuple[str, str], ...] = ()) -> InstanceRecord:
    return InstanceRecord(
        id="0123456789abcdef0123456789abcdef",  # type: ignore[arg-type]
        name="web",
        spec=InstanceSpec(image="/img", labels=labels),
        phase="running",
        runtime="runc",
        cgroup="tidal/pod-0123456789ab",
        created_at=0.0,
        chosen=None,
        limits=Limits(),
    )


def test_pod_identity_from_the_virtual_nodes_labels_or_the_instance() -> None:
    assert PodIdentity.of(_record()) == PodIdentity(
        "tidal", "web", "01234567-89ab-cdef-0123-456789abcdef"
    )
    kube = (
        ("io.kubernetes.pod.name", "web-5f7"),
        ("io.kubernetes.pod.namespace", "shop"),
        ("io.kubernetes.pod.uid", "u-1"),
    )
    assert PodIdentity.of(_record(kube)) == PodIdentity("shop", "web-5f7", "u-1")
    spec = cri_log_spec(
        _record(kube), "side", InstanceSettings(pod_log_dir="/p", container_log_dir="/c")
    )
    assert spec is not None and spec.directory == "/p/shop_web-5f7_u-1/side"
    assert spec.link_path("cid") == "/c/web-5f7_shop_side-cid.log"
    assert cri_log_spec(_record(), "main", InstanceSettings(pod_log_dir="")) is None


def test_main_carries_the_pods_first_container_name_when_the_virtual_node_set_it() -> None:
    kube = (("io.kubernetes.pod.name", "web-5f7"), ("io.kubernetes.container.main", "app"))
    settings = InstanceSettings(pod_log_dir="/p", container_log_dir="/c")
    assert container_name(_record(kube), "main") == "app"
    assert container_name(_record(kube), "side") == "side"
    assert container_name(_record(), "main") == "main"  # an instance run by hand
    spec = cri_log_spec(_record(kube), "main", settings)
    assert spec is not None and spec.directory.endswith("/app")
    assert spec.link_path("cid") == "/c/web-5f7_tidal_app-cid.log"
