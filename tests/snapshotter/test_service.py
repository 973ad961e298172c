"""The gRPC adapter over a real unix socket (no containerd): messages, streaming List, and the
status codes containerd maps back to its errdefs (its unpacker needs ALREADY_EXISTS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tidal.errors import ConfigError
from tidal.snapshotter._proto import snapshots_pb2 as pb
from tidal.snapshotter._proto import snapshots_pb2_grpc as pbg
from tidal.snapshotter.model import SNAPSHOT_REF_LABEL, TIDAL_LAYER_LABEL
from tidal.snapshotter.service import SnapshotterServer

from .fakes import FakeBackend
from .test_snapshotter import IMAGE, REF, _labels


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SnapshotterServer]:
    with SnapshotterServer(
        tmp_path / "s.sock", tmp_path / "root", FakeBackend({REF: IMAGE})
    ) as srv:
        yield srv


@pytest.fixture
def stub(server: SnapshotterServer) -> Iterator[pbg.SnapshotsStub]:
    with grpc.insecure_channel(f"unix:{server.socket_path}") as ch:
        yield pbg.SnapshotsStub(ch)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_the_verbs_over_grpc(stub: pbg.SnapshotsStub) -> None:
    r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="tidal", key="k1", labels={"a": "1"}))
    assert [(m.type, list(m.options)) for m in r.mounts] == [("bind", ["rw", "rbind"])]
    assert stub.Mounts(pb.MountsRequest(key="k1")).mounts == r.mounts
    stub.Commit(pb.CommitSnapshotRequest(name="c1", key="k1", labels={"b": "2"}))
    info = stub.Stat(pb.StatSnapshotRequest(key="c1")).info
    assert (info.name, info.kind, dict(info.labels)) == ("c1", pb.COMMITTED, {"b": "2"})
    assert info.created_at.seconds > 1_600_000_000
    stub.View(pb.ViewSnapshotRequest(key="v1", parent="c1"))
    upd = stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="c1", labels={"c": "3"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.c"]),
        )
    ).info
    assert dict(upd.labels) == {"b": "2", "c": "3"}
    listed = [i.name for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info]
    assert listed == ["c1", "v1"]
    only = stub.List(pb.ListSnapshotsRequest(filters=["kind==view"]))
    assert [i.name for resp in only for i in resp.info] == ["v1"]
    assert stub.Usage(pb.UsageRequest(key="c1")).inodes == 1
    stub.Remove(pb.RemoveSnapshotRequest(key="v1"))
    stub.Cleanup(pb.CleanupRequest())


def test_status_codes_are_the_ones_containerd_maps(stub: pbg.SnapshotsStub) -> None:
    stub.Prepare(pb.PrepareSnapshotRequest(key="k1"))
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k1"))) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert _code(lambda: stub.Stat(pb.StatSnapshotRequest(key="nope"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="k1"))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert _code(
        lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k3", labels={"x": "y" * 5000}))
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    assert _code(lambda: stub.List(pb.ListSnapshotsRequest(filters=["bogus==1"])).next()) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_tidal_layer_answers_already_exists_and_its_target_is_listed(
    stub: pbg.SnapshotsStub,
) -> None:
    req = pb.PrepareSnapshotRequest(key="default/1/extract", labels=_labels("c1", "sha256:l1"))
    assert _code(lambda: stub.Prepare(req)) == grpc.StatusCode.ALREADY_EXISTS
    f = f'labels."{SNAPSHOT_REF_LABEL}"==c1,parent==""'
    found = [i for resp in stub.List(pb.ListSnapshotsRequest(filters=[f])) for i in resp.info]
    assert [(i.name, i.kind, i.labels[TIDAL_LAYER_LABEL]) for i in found] == [
        ("c1", pb.COMMITTED, "data")
    ]


def test_a_second_server_on_the_same_root_or_socket_is_refused(
    server: SnapshotterServer, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="another snapshotter serves root"):
        SnapshotterServer(tmp_path / "other.sock", server.root).start()
    with pytest.raises(ConfigError, match="is in use by another server"):
        SnapshotterServer(server.socket_path, tmp_path / "root2").start()


def test_bad_paths_are_one_line_naming_them(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match=r"--root .*afile is not a directory"):
        SnapshotterServer(tmp_path / "s.sock", afile).start()
    with pytest.raises(ConfigError, match=r"--socket's directory .*afile/sub: cannot create"):
        SnapshotterServer(afile / "sub" / "s.sock", tmp_path / "root").start()
    with pytest.raises(ConfigError, match="holds at most 107"):
        SnapshotterServer(tmp_path / ("a" * 120), tmp_path / "root").start()
