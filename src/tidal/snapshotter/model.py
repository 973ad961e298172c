"""The pure part of the snapshotter: snapshot values, label rules, remote-layer labels, filters,
and which mounts a snapshot gets. No I/O here, so all of it is tested without containerd.

containerd's semantics, as its ``snapshots.Snapshotter`` interface and the overlayfs
snapshotter define them: a snapshot is *active* (writable, from Prepare), a *view* (read-only,
from View) or *committed* (frozen by Commit, the only kind that can be a parent). Keys are
opaque strings chosen by containerd (its metadata layer prefixes them with the namespace and a
sequence number, ``default/7/extract-...``); a committed snapshot is named by its chain ID.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tidal.errors import SnapshotArgumentError


class Kind(enum.IntEnum):
    """The values of the API's ``Kind`` enum (snapshots.proto)."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


KIND_NAMES = {Kind.VIEW: "view", Kind.ACTIVE: "active", Kind.COMMITTED: "committed"}
"""How containerd spells a kind in filters (``kind==committed``) and in ``ctr snapshot ls``."""

LABEL_MAX_BYTES = 4096
"""containerd's ``labels.Validate``: a key and its value together at most 4096 bytes."""

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
"""Set by containerd's unpacker on Prepare: the chain ID the snapshot will be committed as."""
STARGZ_REF_LABEL = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"
"""Added to each layer descriptor by ``ctr-remote images rpull`` (stargz's
``source.AppendDefaultLabelsHandlerWrapper``); the unpacker passes them on as snapshot labels."""
CRI_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
CRI_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
CRI_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
"""Added by the CRI plugin when ``disable_snapshot_annotations = false``."""
TIDAL_LAYER_LABEL = "containerd.io/snapshot/tidal.layer-kind"
"""An annotation of every layer descriptor of a pushed Tidal image (see ``tidal.image.oci``):
under containerd's inherited prefix, so the unpacker hands it to the snapshotter, which thereby
knows a Tidal layer without asking the registry."""


@dataclass(frozen=True)
class RemoteImage:
    """The Tidal image a remote (lazily served) snapshot stands for."""

    reference: str
    manifest_digest: str
    layer_digest: str


@dataclass(frozen=True)
class Snapshot:
    """One snapshot as the store records it (``parent`` is the parent's key, or "")."""

    id: int
    key: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)
    remote: RemoteImage | None = None
    size_bytes: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Mount:
    """A ``containerd.types.Mount``: what containerd mounts (``target`` is left empty)."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class RemoteLayer:
    """What the labels of a Prepare say about a layer of a Tidal image."""

    target: str
    """The chain ID to commit the snapshot as (``containerd.io/snapshot.ref``)."""
    image_ref: str
    layer_digest: str


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``labels``, or :class:`SnapshotArgumentError` naming the first one too long."""
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > LABEL_MAX_BYTES:
            raise SnapshotArgumentError(
                f"label {key!r} is {size} bytes with its value; containerd allows at most "
                f"{LABEL_MAX_BYTES} for a key and its value together"
            )
    return dict(labels)


def remote_layer(labels: Mapping[str, str]) -> RemoteLayer | None:
    """The Tidal layer a Prepare is for, or None (an ordinary layer, or no reference given).

    The reference and digest come from ``ctr-remote images rpull``'s labels or, failing those,
    from the CRI plugin's; the Tidal marker comes from the image's own layer annotation.
    """
    target = labels.get(SNAPSHOT_REF_LABEL, "")
    if not target or TIDAL_LAYER_LABEL not in labels:
        return None
    for ref_label, digest_label in (
        (STARGZ_REF_LABEL, STARGZ_DIGEST_LABEL),
        (CRI_REF_LABEL, CRI_DIGEST_LABEL),
    ):
        ref, digest = labels.get(ref_label, ""), labels.get(digest_label, "")
        if ref and digest:
            return RemoteLayer(target=target, image_ref=ref, layer_digest=digest)
    return None


def unreferenced_tidal_layer(labels: Mapping[str, str]) -> bool:
    """An unpack of a Tidal layer that names no image reference (containerd's unpacker, e.g.
    the CRI plugin with ``disable_snapshot_annotations = true``): applying it would download
    the block layer and then fail, as containerd cannot untar it."""
    return (
        bool(labels.get(SNAPSHOT_REF_LABEL))
        and TIDAL_LAYER_LABEL in labels
        and remote_layer(labels) is None
    )


def updated_labels(
    current: Mapping[str, str], given: Mapping[str, str], fieldpaths: Sequence[str]
) -> dict[str, str]:
    """The labels after Update: only labels are mutable (containerd's ``UpdateInfo``).

    No field paths, or ``labels``, replace them all; ``labels.KEY`` sets or (when ``given``
    lacks KEY) removes one. Any other path is :class:`SnapshotArgumentError`.
    """
    if not fieldpaths:
        return validate_labels(given)
    out = dict(current)
    for path in fieldpaths:
        if path == "labels":
            out = dict(given)
        elif path.startswith("labels."):
            key = path.removeprefix("labels.")
            if key in given:
                out[key] = given[key]
            else:
                out.pop(key, None)
        else:
            raise SnapshotArgumentError(
                f"cannot update field {path!r} of a snapshot; only labels and labels.KEY are mutable"
            )
    return validate_labels(out)


# --- mounts --------------------------------------------------------------------------------


def plan_mounts(kind: Kind, *, fs_dir: str, work_dir: str, lowers: Sequence[str]) -> list[Mount]:
    """The mounts of an active snapshot or a view, as containerd's overlayfs snapshotter:

    - no lower: a bind mount of the snapshot's own directory (rw, or ro for a view);
    - a view of one lower: a read-only bind of it;
    - a view of several: overlay of the lowers only;
    - an active snapshot with lowers: overlay, ``upperdir``/``workdir`` in its directory.

    ``lowers`` are nearest first (overlayfs's order); for a snapshot on a Tidal image the last
    is where the whole image is mounted (its top layer already holds all below).
    """
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise SnapshotArgumentError(f"a {KIND_NAMES.get(kind, kind.name)} snapshot has no mounts")
    ro = kind == Kind.VIEW
    if not lowers:
        return [Mount("bind", fs_dir, ("ro" if ro else "rw", "rbind"))]
    if ro:
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]
    return [
        Mount(
            "overlay",
            "overlay",
            (f"workdir={work_dir}", f"upperdir={fs_dir}", f"lowerdir={':'.join(lowers)}"),
        )
    ]


def lower_chain(ancestors: Iterable[Snapshot]) -> tuple[list[Snapshot], RemoteImage | None]:
    """The ordinary ancestors to stack (nearest first) and the Tidal image under them, if any.

    A remote snapshot stands for a whole Tidal image (its top block layer is a merged view of
    all below), so the walk stops at the first one.
    """
    stack: list[Snapshot] = []
    for snap in ancestors:
        if snap.remote is not None:
            return stack, snap.remote
        stack.append(snap)
    return stack, None


# --- filters -------------------------------------------------------------------------------

_CLAUSE = re.compile(
    r"""^\s*(?P<field>[A-Za-z_][\w]*(?:\.(?:"(?:[^"\\]|\\.)*"|[\w./:-]+))*)\s*
        (?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,]*?))?\s*$""",
    re.X,
)


@dataclass(frozen=True)
class Clause:
    path: tuple[str, ...]
    op: str | None
    value: str


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_path(text: str) -> tuple[str, ...]:
    parts = re.findall(r'"(?:[^"\\]|\\.)*"|[^.]+', text)
    return tuple(_unquote(p) for p in parts)


def _split_commas(text: str) -> list[str]:
    out, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_filter(text: str) -> list[Clause]:
    """One filter of containerd's syntax (``a==b,labels."x"!=y,parent``: clauses ANDed).

    Hand-written because containerd's filter package is Go only; this is the subset that
    snapshots are filtered by (``name``, ``parent``, ``kind``, ``labels.KEY``; ``==``, ``!=``,
    ``~=`` and presence).
    """
    clauses = []
    for part in _split_commas(text):
        m = _CLAUSE.match(part)
        if not m:
            raise SnapshotArgumentError(f"filter {text!r}: cannot parse {part.strip()!r}")
        path = _split_path(m["field"])
        if path[0] not in ("name", "parent", "kind", "labels") or (
            path[0] == "labels" and len(path) != 2
        ):
            raise SnapshotArgumentError(
                f"filter {text!r}: unknown field {m['field']!r} (use name, parent, kind or "
                "labels.KEY)"
            )
        clauses.append(Clause(path, m["op"], _unquote((m["value"] or "").strip())))
    return clauses


def _field(snap: Snapshot, path: tuple[str, ...]) -> str | None:
    if path[0] == "name":
        return snap.key
    if path[0] == "parent":
        return snap.parent
    if path[0] == "kind":
        return KIND_NAMES.get(snap.kind, "unknown")
    return snap.labels.get(path[1])


def matches(snap: Snapshot, filters: Sequence[Sequence[Clause]]) -> bool:
    """Whether ``snap`` passes any of ``filters`` (each a list of clauses that must all hold)."""
    if not filters:
        return True
    for clauses in filters:
        ok = True
        for c in clauses:
            value = _field(snap, c.path)
            if c.op is None:
                ok = value is not None and (c.path[0] == "labels" or value != "")
            elif c.op == "==":
                ok = value == c.value
            elif c.op == "!=":
                ok = value != c.value
            else:
                try:
                    ok = value is not None and re.search(c.value, value) is not None
                except re.error as exc:
                    raise SnapshotArgumentError(f"filter regexp {c.value!r}: {exc}") from exc
            if not ok:
                break
        if ok:
            return True
    return False
