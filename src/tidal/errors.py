"""Tidal's one exception hierarchy.

Every error Tidal raises on purpose derives from :class:`TidalError`. Each part has its own
subtree so callers can catch at the level they care about. Not-found errors also subclass
:class:`FileNotFoundError`; errors that a retry may cure subclass :class:`RetryableError`.
Third-party exceptions are translated at the adapter that meets them (``raise ... from exc``).

Messages name the object and, where there is one, the fix.

Tree (parts add their specific classes below their base, in this file). A class with two
Tidal parents appears under each of them; ``(also a X)`` names a second parent that is drawn
elsewhere, ``(retryable)`` marks a :class:`RetryableError`. ``tests/core/test_errors.py`` checks
that every class of this module appears here with its parents::

    TidalError
    ├── ConfigError                  bad settings or bad user input
    ├── RetryableError (mixin)       transient: a retry may succeed
    ├── NotFoundError                also a FileNotFoundError
    ├── AuthenticationError          no valid cluster credentials (tidal.service.auth)
    ├── MissingExtraError            an optional dependency group is not installed (tidal.extras)
    ├── CgroupError                  core cgroupfs access (tidal.cgroups)
    │   └── CgroupNotFoundError      no such cgroup or knob (also a NotFoundError)
    ├── ToolError                    an external tool failed (tidal.proc's default)
    ├── ImageError                   tidal.image: formats, layers, manifests
    │   ├── FormatError              bytes that do not parse (magic, version, truncation)
    │   ├── ChecksumError            a chunk or blob failed its checksum/digest
    │   ├── LayerError               invalid extents, writes past the end, commit problems
    │   └── ImageNotFoundError       no image at that path or reference (also a NotFoundError)
    ├── BlobError                    tidal.blobs: stores, registry, cache, P2P
    │   ├── BlobNotFoundError        (also a NotFoundError)
    │   │   └── ManifestNotFoundError  no manifest under this tag or digest
    │   ├── BlobRangeError           a byte range outside the blob
    │   ├── BlobIntegrityError       bytes that fail their digest or the caller's chunk check
    │   ├── BlobUnavailableError (retryable)  no source (peer, registry) can serve it now
    │   │   ├── RegistryUnavailableError  (also a RegistryError) unreachable, 5xx, 429
    │   │   └── P2PError             a P2P root or peer cannot serve; the registry still can
    │   │       └── PeerUnreachableError  a peer did not answer at all
    │   ├── RegistryError
    │   │   ├── RegistryAuthError
    │   │   ├── RegistryUnavailableError  (see above: under both parents)
    │   │   └── RegistryServerError  the project's own registry process failed to start
    │   └── CacheError
    ├── BlockDeviceError             tidal.blockdev: FUSE, loop, mount, mkfs
    │   ├── MountError
    │   │   └── MountNotFoundError   (also a NotFoundError) no Tidal mount at that path
    │   ├── FuseServerError          the FUSE block device server did not start or died
    │   ├── FdStoreError             the fd store's holder cannot be reached or refused
    │   └── BuildError               building/converting an image (mkfs, copy, OCI archive)
    │       ├── ArchiveFormatError   an OCI layout / docker-archive that does not parse
    │       └── UnsafeArchiveError   a layer tar entry would escape the root (.., symlinked parent)
    ├── ImageStoreError              tidal.node: the node's image store by reference
    │   ├── ImageReferenceNotFoundError  (also a NotFoundError) not in its registry / on the node
    │   └── ImageInUseError          removing an image that containers use (without --force)
    ├── EngineError                  tidal.engine
    │   ├── ContainerNotFoundError   (also a NotFoundError)
    │   ├── ContainerStateError
    │   ├── OciRuntimeError          the OCI runtime (runc/crun) failed
    │   ├── DaemonUnavailableError (retryable)  the engine daemon's socket does not answer
    │   └── QuotaError
    ├── InstanceError                tidal.instance
    │   ├── InstanceNotFoundError    (also a NotFoundError) no instance with that name or id
    │   ├── InstanceStateError       the operation does not fit the instance's state
    │   ├── NoCapacityError (retryable)  no candidate spec fits the node's free capacity now
    │   └── LimitError               a pod-level limit could not be applied (cgroup, tc)
    ├── VirtualNodeError             tidal.vnode: the Kubernetes virtual node
    │   └── PodRefusedError          (also a ConfigError) a pod this node cannot run as an instance
    ├── SnapshotError                tidal.snapshotter: containerd's snapshots API
    │   ├── SnapshotNotFoundError    (also a NotFoundError) no snapshot with that key
    │   ├── SnapshotExistsError      the key (or a remote snapshot's target name) exists already
    │   ├── SnapshotStateError       wrong kind for the call (commit a view, remove a parent)
    │   └── SnapshotArgumentError    a label too long, an unknown field path, a bad filter
    ├── SchedError                   tidal.sched
    │   ├── StockError               a virtual spec (and every allowed upgrade) is sold out
    │   ├── PlacementError
    │   └── KubeApiError             the Kubernetes API refused a request (controller, virtual node)
    │       ├── KubeApiUnavailableError (retryable)  unreachable, 5xx, 429
    │       ├── KubeApiForbiddenError    401/403: RBAC or credentials
    │       ├── KubeApiNotFoundError     404: the object is gone (also a FileNotFoundError)
    │       ├── KubeApiConflictError     409: changed or already done by someone else
    │       └── KubeApiGoneError         410: a watch's resourceVersion expired; relist
    └── QosError                     tidal.qos
        ├── RuleError                invalid or unloadable rules file (also a ConfigError)
        ├── AdjustmentError          a change failed to apply or verify (it was rolled back)
        └── ExperimentError          the co-location experiment could not run
"""

from __future__ import annotations


class TidalError(Exception):
    """Root of every error Tidal raises on purpose."""


class ConfigError(TidalError, ValueError):
    """Settings or user input that cannot be used as given."""


class AuthenticationError(TidalError):
    """A request (or an answer) without valid credentials: not a member of this cluster."""


class MissingExtraError(TidalError, ImportError):
    """A command needs a pip extra that is not installed; the message names it."""


class RetryableError(TidalError):
    """A transient failure: the same call may succeed later."""


class NotFoundError(TidalError, FileNotFoundError):
    """Something named by the caller does not exist."""

    def __str__(self) -> str:  # FileNotFoundError's __str__ mangles single-arg messages
        return str(self.args[0]) if self.args else self.__class__.__name__


# --- core: cgroups, external tools -------------------------------------------------------


class CgroupError(TidalError):
    """Reading or writing a cgroup file failed (``tidal.cgroups``, used by engine and QoS)."""


class CgroupNotFoundError(CgroupError, NotFoundError):
    """The cgroup directory or one of its knob files does not exist."""


class ToolError(TidalError):
    """An external tool run by ``tidal.proc`` failed; callers pass a more specific class."""


# --- tidal.image ---------------------------------------------------------------------------


class ImageError(TidalError):
    """Block image format, layers and manifests."""


class FormatError(ImageError):
    """Bytes that do not parse: wrong magic, unknown version, truncation, bad field."""


class ChecksumError(ImageError):
    """A chunk or blob does not match its checksum or digest."""


class LayerError(ImageError):
    """Invalid extents, writes past the device end, or a failed commit."""


class ImageNotFoundError(ImageError, NotFoundError):
    """No image at the given path or reference."""


# --- tidal.blobs ---------------------------------------------------------------------------


class BlobError(TidalError):
    """Where bytes come from: local store, registry, chunk cache, peers."""


class BlobNotFoundError(BlobError, NotFoundError):
    """The blob store or registry has no blob with this digest."""


class ManifestNotFoundError(BlobNotFoundError):
    """The repository has no manifest under this tag or digest."""


class RegistryError(BlobError):
    """An OCI distribution registry refused or failed a request."""


class RegistryAuthError(RegistryError):
    """The registry wants credentials that are missing or wrong."""


class CacheError(BlobError):
    """The on-disk chunk cache is unusable."""


class BlobRangeError(BlobError, ValueError):
    """A byte range that is empty-negative or reaches past the end of the blob."""


class BlobIntegrityError(BlobError):
    """Bytes that do not match their blob digest or fail the caller's chunk check."""


class BlobUnavailableError(BlobError, RetryableError):
    """No source in a chain (peers, registry) could serve the blob right now."""


class RegistryUnavailableError(RegistryError, BlobUnavailableError):
    """The registry could not be reached or answered 5xx/429.

    A :class:`BlobUnavailableError` because that is what it means to a reader (no source can
    serve the blob now: retry later), so a chain or cache catches one class for peers and
    registry alike; still a :class:`RegistryError`, so code talking to a registry (auth,
    uploads) catches every registry failure with one clause.
    """


class RegistryServerError(RegistryError):
    """The registry process Tidal starts (tests, demo, benchmarks) failed to start or stop."""


class P2PError(BlobUnavailableError):
    """A P2P root or peer could not serve a request; the registry still can."""


class PeerUnreachableError(P2PError):
    """A peer did not answer at all (connection refused, timeout): it is gone from its tree."""


# --- tidal.blockdev ------------------------------------------------------------------------


class BlockDeviceError(TidalError):
    """FUSE block device, loop devices, mkfs and mounts."""


class MountError(BlockDeviceError):
    """A mount, unmount, attach or detach failed."""


class MountNotFoundError(MountError, NotFoundError):
    """No Tidal mount is recorded at the given target."""


class FuseServerError(BlockDeviceError):
    """The FUSE block device server did not become ready, or died."""


class FdStoreError(BlockDeviceError):
    """The fd store's holder (``tidal.blockdev.fdstore``) cannot be reached or refused."""


class BuildError(BlockDeviceError):
    """Building or converting an image failed (mkfs, copy, layer application)."""


class ArchiveFormatError(BuildError):
    """An OCI image layout or docker-archive that does not parse."""


class UnsafeArchiveError(BuildError):
    """A layer tar entry that would write outside the root (``..``, absolute link, symlinked parent)."""


# --- tidal.node ----------------------------------------------------------------------------


class ImageStoreError(TidalError):
    """The node-local image store (references -> pulled images)."""


class ImageReferenceNotFoundError(ImageStoreError, NotFoundError):
    """The registry has no image under this reference, or the node has not pulled it."""


class ImageInUseError(ImageStoreError):
    """An image that containers on this node use cannot be removed without ``--force``."""


# --- tidal.engine --------------------------------------------------------------------------


class EngineError(TidalError):
    """Container engine."""


class ContainerNotFoundError(EngineError, NotFoundError):
    """No container with this id or name."""


class ContainerStateError(EngineError):
    """The operation does not fit the container's state (e.g. exec in a stopped one)."""


class OciRuntimeError(EngineError):
    """The OCI runtime (runc/crun) failed; the message carries its stderr."""


class DaemonUnavailableError(EngineError, RetryableError):
    """The engine daemon does not answer on its socket (not started, or restarting)."""


class QuotaError(EngineError):
    """Disk quota could not be set up or parsed."""


# --- tidal.snapshotter ---------------------------------------------------------------------


class SnapshotError(TidalError):
    """containerd's snapshots API served by Tidal: each subclass is one gRPC status code."""


class SnapshotNotFoundError(SnapshotError, NotFoundError):
    """No snapshot with this key (containerd's ErrNotFound, gRPC NOT_FOUND)."""


class SnapshotExistsError(SnapshotError, FileExistsError):
    """The key or target name exists already (ErrAlreadyExists, gRPC ALREADY_EXISTS); for a
    remote snapshot this is the answer that tells containerd to skip the layer's download."""


class SnapshotStateError(SnapshotError):
    """The snapshot's kind or children forbid the call (ErrFailedPrecondition)."""


class SnapshotArgumentError(SnapshotError, ValueError):
    """A label, field path or filter that is not valid (ErrInvalidArgument)."""


# --- tidal.instance ------------------------------------------------------------------------


class InstanceError(TidalError):
    """Elastic container instances, pools and specs."""


class InstanceNotFoundError(InstanceError, NotFoundError):
    """No instance with this name or id."""


class InstanceStateError(InstanceError):
    """The operation does not fit the instance's state (e.g. exec in a stopped one)."""


class NoCapacityError(InstanceError, RetryableError):
    """No candidate instance spec fits the node's free capacity; the message says what is short."""


class LimitError(InstanceError):
    """A pod-level limit (cgroup, traffic control, block I/O) could not be applied."""


# --- tidal.vnode ---------------------------------------------------------------------------


class VirtualNodeError(TidalError):
    """The Kubernetes virtual node (``tidal virtual-node``)."""


class PodRefusedError(VirtualNodeError, ConfigError):
    """A pod the virtual node cannot run as an instance (valueFrom env, init containers, ...);
    the pod gets phase Failed with this message."""


# --- tidal.sched ---------------------------------------------------------------------------


class SchedError(TidalError):
    """Hybrid scheduler."""


class StockError(SchedError):
    """A virtual spec and every allowed upgrade of it is out of stock."""


class PlacementError(SchedError):
    """No unit of the resource policy can take the pod."""


class KubeApiError(SchedError):
    """The Kubernetes API server refused a request of the controller or the virtual node (4xx,
    bad kubeconfig)."""


class KubeApiUnavailableError(KubeApiError, RetryableError):
    """The Kubernetes API server could not be reached or answered 5xx/429."""


class KubeApiForbiddenError(KubeApiError):
    """401/403: the controller's credentials or RBAC do not allow the request."""


class KubeApiNotFoundError(KubeApiError, FileNotFoundError):
    """404: the object (a pod just deleted, a namespace) does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class KubeApiConflictError(KubeApiError):
    """409: the object changed under the request or the action was already done."""


class KubeApiGoneError(KubeApiError):
    """410: a watch's resourceVersion is too old; list again and watch from there."""


# --- tidal.qos -----------------------------------------------------------------------------


class QosError(TidalError):
    """Node QoS agent."""


class RuleError(QosError, ConfigError):
    """A rules file that does not load or validate."""


class AdjustmentError(QosError):
    """A cgroup change did not apply or read back as written; it was rolled back."""


class ExperimentError(QosError):
    """The co-location experiment could not set up or run its workloads."""
