"""The pure part: label rules, remote-layer labels, Update's field paths, mounts, filters."""

from __future__ import annotations

import pytest

from tidal.errors import SnapshotArgumentError
from tidal.snapshotter.model import (
    CRI_DIGEST_LABEL,
    CRI_REF_LABEL,
    SNAPSHOT_REF_LABEL,
    STARGZ_DIGEST_LABEL,
    STARGZ_REF_LABEL,
    TIDAL_LAYER_LABEL,
    Kind,
    Mount,
    RemoteImage,
    RemoteLayer,
    Snapshot,
    lower_chain,
    matches,
    parse_filter,
    plan_mounts,
    remote_layer,
    unreferenced_tidal_layer,
    updated_labels,
    validate_labels,
)


def _snap(key: str, parent: str = "", kind: Kind = Kind.COMMITTED, **labels: str) -> Snapshot:
    return Snapshot(1, key, parent, kind, 0, 0, labels)


def test_a_label_over_4096_bytes_with_its_value_is_refused() -> None:
    assert validate_labels({"k": "v" * 4095}) == {"k": "v" * 4095}
    with pytest.raises(SnapshotArgumentError, match="label 'k' is 4097 bytes"):
        validate_labels({"k": "v" * 4096})


def test_remote_layer_needs_the_target_the_tidal_marker_and_a_reference() -> None:
    base = {SNAPSHOT_REF_LABEL: "sha256:c1", TIDAL_LAYER_LABEL: "data"}
    stargz = {STARGZ_REF_LABEL: "reg/app:1", STARGZ_DIGEST_LABEL: "sha256:l1"}
    cri = {CRI_REF_LABEL: "reg/app:2", CRI_DIGEST_LABEL: "sha256:l2"}
    assert remote_layer({**base, **stargz}) == RemoteLayer("sha256:c1", "reg/app:1", "sha256:l1")
    assert remote_layer({**base, **cri}) == RemoteLayer("sha256:c1", "reg/app:2", "sha256:l2")
    assert remote_layer({**base, **stargz, **cri}).image_ref == "reg/app:1"  # type: ignore[union-attr]
    assert remote_layer(base) is None  # `ctr pull`: no reference, so apply as usual
    assert remote_layer({SNAPSHOT_REF_LABEL: "sha256:c1", **stargz}) is None  # ordinary layer
    assert remote_layer({TIDAL_LAYER_LABEL: "data", **stargz}) is None  # not an unpack


def test_update_changes_only_labels() -> None:
    cur = {"a": "1", "b": "2"}
    assert updated_labels(cur, {"c": "3"}, []) == {"c": "3"}
    assert updated_labels(cur, {"c": "3"}, ["labels"]) == {"c": "3"}
    assert updated_labels(cur, {"a": "9"}, ["labels.a", "labels.b"]) == {"a": "9"}
    with pytest.raises(SnapshotArgumentError, match="field 'parent'"):
        updated_labels(cur, {}, ["parent"])


def test_mounts_follow_containerds_overlay_snapshotter() -> None:
    kw = {"fs_dir": "/r/1/fs", "work_dir": "/r/1/work"}
    assert plan_mounts(Kind.ACTIVE, lowers=[], **kw) == [Mount("bind", "/r/1/fs", ("rw", "rbind"))]
    assert plan_mounts(Kind.VIEW, lowers=[], **kw) == [Mount("bind", "/r/1/fs", ("ro", "rbind"))]
    assert plan_mounts(Kind.VIEW, lowers=["/a"], **kw) == [Mount("bind", "/a", ("ro", "rbind"))]
    assert plan_mounts(Kind.VIEW, lowers=["/a", "/b"], **kw) == [
        Mount("overlay", "overlay", ("lowerdir=/a:/b",))
    ]
    assert plan_mounts(Kind.ACTIVE, lowers=["/a", "/b"], **kw) == [
        Mount("overlay", "overlay", ("workdir=/r/1/work", "upperdir=/r/1/fs", "lowerdir=/a:/b"))
    ]
    with pytest.raises(SnapshotArgumentError):
        plan_mounts(Kind.COMMITTED, lowers=[], **kw)


def test_the_lower_chain_stops_at_a_tidal_image() -> None:
    img = RemoteImage("reg/app:1", "sha256:m", "sha256:l2")
    top = Snapshot(3, "c3", "c2", Kind.COMMITTED, 0, 0)
    remote2 = Snapshot(2, "c2", "c1", Kind.COMMITTED, 0, 0, remote=img)
    remote1 = Snapshot(1, "c1", "", Kind.COMMITTED, 0, 0, remote=img)
    stack, image = lower_chain([top, remote2, remote1])
    assert [s.key for s in stack] == ["c3"] and image == img
    assert lower_chain([top]) == ([top], None)


def test_filters_as_containerds_metadata_layer_sends_them() -> None:
    snap = _snap("default/4/sha256:c1", "sha256:p", **{SNAPSHOT_REF_LABEL: "sha256:c1"})
    f = parse_filter(f'labels."{SNAPSHOT_REF_LABEL}"==sha256:c1,parent=="sha256:p"')
    assert matches(snap, [f])
    assert not matches(snap, [parse_filter('parent=="other"')])
    assert matches(snap, [parse_filter('parent=="other"'), parse_filter("kind==committed")])
    assert matches(snap, [parse_filter(f'labels."{SNAPSHOT_REF_LABEL}"')])
    assert not matches(snap, [parse_filter("labels.missing")])
    assert matches(snap, [parse_filter("name~=^default/")])
    assert matches(snap, [])
    with pytest.raises(SnapshotArgumentError, match="unknown field 'size'"):
        parse_filter("size==3")
    with pytest.raises(SnapshotArgumentError, match="cannot parse"):
        parse_filter("==x")


def test_a_tidal_layer_unpacked_without_a_reference_is_recognised() -> None:
    marker = {SNAPSHOT_REF_LABEL: "sha256:c1", TIDAL_LAYER_LABEL: "data"}
    assert unreferenced_tidal_layer(marker)
    assert not unreferenced_tidal_layer(
        {**marker, STARGZ_REF_LABEL: "r", STARGZ_DIGEST_LABEL: "sha256:l"}
    )
    assert not unreferenced_tidal_layer({SNAPSHOT_REF_LABEL: "sha256:c1"})  # ordinary layer
    assert not unreferenced_tidal_layer({TIDAL_LAYER_LABEL: "data"})  # not an unpack
