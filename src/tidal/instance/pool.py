"""Warm sandbox pools: per shape, pods made ahead of the instances that will take them.

A pool member is everything of a pod that does not depend on what will run in it: the pod's
cgroup with the shape's CPU, memory and pids limits, the sandbox container created with its
named netns, veth, address and ``tc`` shaping, and, under runc/crun, the pod's IPC and UTS
namespace files (and no process: :meth:`InstanceManager.sandbox_runs
<tidal.instance.manager.InstanceManager.sandbox_runs>`); under runsc it is started, its gVisor
sandbox kernel running. An
instance whose shape has a ready member takes it (:meth:`Pools.take`): the manager renames
the sandbox to the instance's, sets the hostname and writes ``/etc/hosts``, then creates and
starts only the members (:mod:`tidal.instance.manager`).

**The key** (:class:`PoolKey`) is the runtime plus the *chosen* limits (the instance type the
fallback took, with the ad-hoc values over it): every limit is in it because each is applied
to the sandbox or its cgroup before hand-out (CPU, memory, pids on the cgroup; bandwidth and
packet rates as ``tc`` on the veth), so two instances share a pool only if their pods would
be identical. Disk limits are in the key too (they are part of the shape) but are written at
hand-out, when the members' block devices are known. Nothing of the instance's name,
labels, env or images is in the key: those are set or made at hand-out.

**Published ports**: an instance that publishes ports bypasses the pools (its sandbox is made
on the spot, as without pools). The ports are bound by the sandbox's monitor when the
sandbox starts (:mod:`tidal.engine.monitor`, owned by the light path), so late binding would
mean a second listener protocol in the monitor; instances that publish ports are also the
long-lived ones, where 0.2 s at create matters least.

**Bounded**: the refill thread adds a member only while the live instances' reservations plus
every pool member's (made or being made) leave room for it in the node's capacity
(:meth:`SandboxFactory.room_for`), and a create that misses evicts idle members of any pool
before it would overbook the node.

**Crash safety**: a member's record (:class:`PoolStore`, one JSON file each) is written before
anything of it is made (phase ``making``), turns ``ready`` once the sandbox is made (and runs, under runsc) and shaping
is on, and is deleted only after the instance that took it has written its own record naming
the member (``InstanceRecord.pool_member``). On daemon start the manager keeps every ready
member whose sandbox still runs whole, tears down everything else a record names, and the
refill thread rebuilds the pools to their targets.

Targets come from :class:`~tidal.instance.reuse.ReuseModel` (learned per shape from the
create/release history), bounded by ``[instance] pool_min``/``pool_max`` and raised by
:meth:`Pools.prewarm`. One refill thread serves every pool, one member at a time (a member
costs a container create, a netns and a cgroup, and under runsc a start; more at once would
compete with the creates the pool is meant to speed up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tidal.errors import ConfigError, InstanceError, NoCapacityError, TidalError
from tidal.fsutil import write_text_atomic
from tidal.instance.capacity import Capacity
from tidal.instance.reuse import DEFAULT_REFILL_S, ReuseModel
from tidal.instance.spec import InstanceSpec, Limits

log = logging.getLogger(__name__)

MEMBER_PHASES = ("making", "ready", "cleaning")
REFILL_TICK_S = 1.0
"""How often the refill thread looks at the targets without being woken (the learned ones
fall with time alone)."""
REFILL_EWMA = 0.3
"""Weight of the newest member's make time in the measured refill time."""
FAILURE_BACKOFF_S = 5.0
"""After a member failed to be made, its pool waits this long before the next try."""
REFILL_YIELD_S = 2.0
"""The refill thread waits while instance creates are in flight, at most this long per
member: a hit's own start would otherwise share the node's CPUs with the refill of the
member it just took (on 2 cores main's start went from ~70 to ~150 ms)."""


@dataclass(frozen=True)
class PoolKey:
    """A pool's shape: the runtime and the chosen limits (see the module docstring)."""

    runtime: str
    limits: Limits

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "limits": self.limits.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolKey:
        return cls(str(data["runtime"]), Limits.from_json(dict(data.get("limits") or {})))

    @property
    def id(self) -> str:
        """A short stable name of the shape (file names, labels, the model's history)."""
        raw = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:12]

    def describe(self) -> str:
        lim = self.limits
        parts = [self.runtime]
        if lim.cpus is not None:
            parts.append(f"{lim.cpus:g} CPUs")
        if lim.memory_bytes is not None:
            parts.append(f"{lim.memory_bytes // (1024 * 1024)} MiB")
        return ", ".join(parts)


@dataclass(frozen=True)
class PoolMember:
    """One warm pod as recorded (see the module docstring for the phases)."""

    id: str
    key: PoolKey
    phase: str
    cgroup: str
    """The pod cgroup below each hierarchy's root (``tidal/pod-<id12>``)."""
    created_at: float
    sandbox_id: str | None = None
    ip: str | None = None
    unenforced: tuple[str, ...] = ()

    @property
    def sandbox_name(self) -> str:
        """Two dots: no ``<instance>.<member>`` container name can be this."""
        return f"pool.{self.id[:16]}.sandbox"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key.to_json(),
            "phase": self.phase,
            "cgroup": self.cgroup,
            "created_at": self.created_at,
            "sandbox_id": self.sandbox_id,
            "ip": self.ip,
            "unenforced": list(self.unenforced),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolMember:
        try:
            phase = str(data["phase"])
            if phase not in MEMBER_PHASES:
                raise ValueError(f"phase {phase!r}")
            return cls(
                id=str(data["id"]),
                key=PoolKey.from_json(data["key"]),
                phase=phase,
                cgroup=str(data["cgroup"]),
                created_at=float(data["created_at"]),
                sandbox_id=data.get("sandbox_id"),
                ip=data.get("ip"),
                unenforced=tuple(data.get("unenforced") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"pool member record is malformed: {exc!r}") from exc

    def replace(self, **changes: Any) -> PoolMember:
        return replace(self, **changes)


class PoolStore:
    """Pool member records, one JSON file each (written by rename, like instance records)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def state_path(self) -> Path:
        """Each pool's shape, prewarm floor and learned size, for a restarted daemon."""
        return self.dir.parent / "pools.json"

    def save_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            write_text_atomic(self.state_path, json.dumps(state, sort_keys=True))

    def load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("pool state %s is unreadable (%s); starting empty", self.state_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def put(self, member: PoolMember) -> PoolMember:
        with self._lock:
            write_text_atomic(self.dir / f"{member.id}.json", json.dumps(member.to_json()))
        return member

    def delete(self, mid: str) -> None:
        with self._lock:
            (self.dir / f"{mid}.json").unlink(missing_ok=True)

    def list(self) -> list[PoolMember]:
        out = []
        with self._lock:
            for p in self.dir.glob("*.json"):
                try:
                    out.append(PoolMember.from_json(json.loads(p.read_text())))
                except (OSError, ValueError) as exc:
                    log.warning("pool member record %s is unreadable (%s); dropping it", p, exc)
                    p.unlink(missing_ok=True)
        return sorted(out, key=lambda m: m.created_at)


class SandboxFactory(Protocol):
    """What the pools need of the instance manager (the host effects)."""

    def make_member(self, member: PoolMember) -> PoolMember:
        """Make the member's pod (its record says ``making``); return it ``ready``."""

    def destroy_member(self, member: PoolMember) -> None:
        """Tear down whatever of the member exists (idempotent)."""

    def room_for(self, key: PoolKey, pooled: Capacity) -> bool:
        """Whether the node's capacity holds one more member of ``key`` besides the live
        instances and the members counted by ``pooled`` (see :meth:`Pools.pooled`)."""

    def key_of(self, spec: InstanceSpec) -> PoolKey:
        """The shape an instance of ``spec`` would get now (its fallback's choice)."""


@dataclass
class _Pool:
    key: PoolKey
    ready: list[PoolMember] = field(default_factory=list)
    making: int = 0
    in_use: int = 0
    pinned: int = 0
    refill_s: float = DEFAULT_REFILL_S
    hits: int = 0
    misses: int = 0
    failed_at: float = 0.0
    last_error: str | None = None
    no_room: bool = False
    """The last refill found no room in the node's capacity for another member."""


class Pools:
    """Every pool of one node: targets, ready members, the refill thread. Thread-safe."""

    def __init__(
        self,
        store: PoolStore,
        factory: SandboxFactory,
        *,
        pool_min: int,
        pool_max: int,
        model: ReuseModel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.factory = factory
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.model = model or ReuseModel()
        self.clock = clock
        self._pools: dict[str, _Pool] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._paused = False
        self._foreground = 0
        self._thread: threading.Thread | None = None
        self._saved: dict[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        return self.pool_max > 0

    def _pool(self, key: PoolKey) -> _Pool:
        return self._pools.setdefault(key.id, _Pool(key))

    # --- targets ---------------------------------------------------------------------------------

    def _target(self, p: _Pool, now: float) -> int:
        if not self.enabled or self._paused:
            return 0
        learned = self.model.target(p.key.id, now, pool_min=self.pool_min, pool_max=self.pool_max)
        return min(self.pool_max, max(learned, p.pinned))

    def target(self, key: PoolKey) -> int:
        with self._cond:
            return self._target(self._pool(key), self.clock())

    # --- what a restarted daemon needs --------------------------------------------------------

    def _state_locked(self) -> dict[str, Any]:
        now = self.clock()
        return {
            k: {
                "key": p.key.to_json(),
                "pinned": p.pinned,
                "learned": self.model.learned(k, now),
                "refill_s": round(p.refill_s, 3),
            }
            for k, p in self._pools.items()
        }

    def save_state(self) -> None:
        """Write each pool's shape, floor and learned size when they changed."""
        with self._cond:
            state = self._state_locked()
            if state == self._saved:
                return
            self._saved = state
        self.store.save_state(state)

    def load_state(self) -> None:
        """On daemon start: the pools the last daemon had, with their floors, and their
        learned sizes seeded as one burst each (so they refill, then fade if idle)."""
        state = self.store.load_state()
        with self._cond:
            now = self.clock()
            for k, entry in state.items():
                try:
                    key = PoolKey.from_json(entry["key"])
                    pinned, learned = int(entry.get("pinned", 0)), int(entry.get("learned", 0))
                    refill_s = float(entry.get("refill_s", DEFAULT_REFILL_S))
                except (KeyError, TypeError, ValueError, ConfigError) as exc:
                    log.warning("dropping unreadable pool state for %s: %s", k, exc)
                    continue
                p = self._pool(key)
                p.pinned = min(max(p.pinned, pinned), self.pool_max)
                p.refill_s = refill_s
                self.model.seed(key.id, learned, now)
            self._saved = self._state_locked()

    # --- hand-out and return ---------------------------------------------------------------------

    def take(self, key: PoolKey) -> PoolMember | None:
        """A ready member of ``key`` for a new instance (None: a miss); either way the create
        is recorded in the shape's history and the refill thread is woken."""
        if not self.enabled:
            return None
        with self._cond:
            p = self._pool(key)
            self.model.record_create(key.id, self.clock(), p.refill_s)
            # the newest first: a just-released sandbox is the warmest (its pages in cache)
            member = p.ready.pop() if p.ready else None
            if member is None:
                p.misses += 1
            else:
                p.hits += 1
                p.in_use += 1
        self._wake.set()
        return member

    def put_back(self, member: PoolMember) -> None:
        """A member taken by :meth:`take` whose hand-out failed before it was changed."""
        with self._cond:
            p = self._pool(member.key)
            p.in_use = max(p.in_use - 1, 0)
            p.ready.append(member)
            self._cond.notify_all()

    def wants(self, key: PoolKey) -> bool:
        """Whether a released sandbox of ``key`` should go back to its pool (below target)."""
        if not self.enabled:
            return False
        with self._cond:
            p = self._pool(key)
            return len(p.ready) + p.making < self._target(p, self.clock())

    def released(self, key: PoolKey, *, from_pool: bool) -> None:
        """An instance of ``key`` is gone (its sandbox reused or torn down)."""
        with self._cond:
            p = self._pool(key)
            self.model.record_release(key.id, self.clock())
            if from_pool:
                p.in_use = max(p.in_use - 1, 0)
        self._wake.set()

    def add_ready(self, member: PoolMember) -> None:
        """A ready member (made by the refill, cleaned after a release, or found on start)."""
        with self._cond:
            self._pool(member.key).ready.append(member)
            self._cond.notify_all()

    def adopt_in_use(self, key: PoolKey) -> None:
        """On daemon start: a live instance whose sandbox came from a pool."""
        with self._cond:
            self._pool(key).in_use += 1

    # --- capacity --------------------------------------------------------------------------------

    def pooled(self) -> Capacity:
        """What every member made or being made holds of the node."""
        with self._cond:
            return Capacity.total(map(Capacity.of, self.pooled_limits_locked()))

    def evict_one(self, *, prefer_not: PoolKey | None = None) -> PoolMember | None:
        """Take an idle member out of its pool to be torn down (other shapes first, then the
        fullest pool): a create that needs the room comes before a warm sandbox."""
        with self._cond:
            pools = [p for p in self._pools.values() if p.ready]
            if not pools:
                return None
            pools.sort(
                key=lambda p: (prefer_not is not None and p.key == prefer_not, -len(p.ready))
            )
            return pools[0].ready.pop()

    # --- prewarm, wait, status -------------------------------------------------------------------

    def prewarm(self, spec: InstanceSpec | PoolKey, count: int) -> None:
        """Raise the pool of the spec's shape (or of ``key``) to a target of at least
        ``count`` and make members now, in this thread, until it holds that many ready."""
        key = spec if isinstance(spec, PoolKey) else self.factory.key_of(spec)
        if not self.enabled:
            raise ConfigError("warm pools are off on this node; set [instance] pool_max above 0")
        if count < 0 or count > self.pool_max:
            raise ConfigError(
                f"prewarm count {count} is outside 0..[instance] pool_max ({self.pool_max})"
            )
        with self._cond:
            self._paused = False
            p = self._pool(key)
            p.pinned = max(p.pinned, count)
        self.save_state()
        while True:
            with self._cond:
                if len(p.ready) + p.making >= count:
                    break
            if not self._make_one(p, raise_errors=True):
                raise NoCapacityError(
                    f"the node has no room for another warm sandbox of {key.describe()} "
                    f"(pool holds {len(p.ready)} of {count})"
                )
        self.wait_ready(timeout_s=300.0, keys=[key.id])

    def wait_ready(self, timeout_s: float, keys: list[str] | None = None) -> None:
        """Block until every pool (or those of ``keys``) holds its target ready."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._cond:
            while True:
                now = self.clock()
                short = [
                    f"{p.key.describe()}: {len(p.ready)} of {self._target(p, now)}"
                    + (f" (last error: {p.last_error})" if p.last_error else "")
                    + (" (held back: no room left in the node's capacity)" if p.no_room else "")
                    for k, p in self._pools.items()
                    if (keys is None or k in keys) and len(p.ready) < self._target(p, now)
                ]
                if not short:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise InstanceError(
                        f"warm pools not filled within {timeout_s:g}s: {'; '.join(short)}"
                    )
                self._cond.wait(min(left, 0.5))

    def status(self) -> list[dict[str, Any]]:
        with self._cond:
            now = self.clock()
            return [
                {
                    "shape": p.key.to_json(),
                    "id": k,
                    "target": self._target(p, now),
                    "ready": len(p.ready),
                    "making": p.making,
                    "in_use": p.in_use,
                    "hits": p.hits,
                    "misses": p.misses,
                    "refill_s": round(p.refill_s, 4),
                    "releases_in_window": self.model.releases_in(k, now),
                    "last_error": p.last_error,
                    "no_room": p.no_room,
                }
                for k, p in sorted(self._pools.items())
            ]

    def drain(self) -> int:
        """Tear down every idle member and stop refilling until the next :meth:`prewarm`
        (for tests and benchmarks that must leave nothing behind). Returns how many went."""
        with self._cond:
            self._paused = True
            for p in self._pools.values():
                p.pinned = 0
            doomed = [m for p in self._pools.values() for m in p.ready]
            for p in self._pools.values():
                p.ready.clear()
            self._saved = None
        self.store.save_state({})  # a restarted daemon does not refill drained pools
        while True:
            with self._cond:
                if not any(p.making for p in self._pools.values()):
                    break
                self._cond.wait(0.2)
        for m in doomed:
            self._destroy(m)
        return len(doomed)

    # --- making and tearing down -----------------------------------------------------------------

    def _destroy(self, member: PoolMember) -> None:
        try:
            self.factory.destroy_member(member)
        except TidalError as exc:
            log.error("tearing down warm sandbox %s: %s", member.sandbox_name, exc)
            return
        self.store.delete(member.id)

    def destroy(self, member: PoolMember) -> None:
        """Tear down a member taken out by :meth:`evict_one` (or found broken)."""
        self._destroy(member)

    def _make_one(self, p: _Pool, *, raise_errors: bool = False) -> bool:
        """Make one member of ``p`` if the node has room; False: no room."""
        with self._cond:
            pooled = self.pooled_limits_locked()
            p.no_room = not self.factory.room_for(p.key, Capacity.total(map(Capacity.of, pooled)))
            if p.no_room:
                return False
            p.making += 1
        member = PoolMember(
            id=secrets.token_hex(16),
            key=p.key,
            phase="making",
            cgroup="",
            created_at=time.time(),
        )
        member = member.replace(cgroup=self.cgroup_of(member))
        t0 = time.monotonic()
        try:
            self.store.put(member)  # the intent, before any effect
            made = self.factory.make_member(member)
            self.store.put(made)
        except BaseException as exc:
            with self._cond:
                p.making -= 1
                p.failed_at = self.clock()
                p.last_error = str(exc)
                self._cond.notify_all()
            self._destroy(member)
            if raise_errors or not isinstance(exc, TidalError):
                raise
            log.warning("making a warm sandbox of %s failed: %s", p.key.describe(), exc)
            return True
        took = time.monotonic() - t0
        with self._cond:
            p.making -= 1
            p.last_error = None
            p.refill_s = (1 - REFILL_EWMA) * p.refill_s + REFILL_EWMA * took
            p.ready.append(made)
            self._cond.notify_all()
        return True

    cgroup_parent = "tidal"
    """The engine's cgroup parent (set by the manager); members' cgroups go below it."""

    def cgroup_of(self, member: PoolMember) -> str:
        return f"{self.cgroup_parent}/pod-{member.id[:12]}"

    def pooled_limits_locked(self) -> list[Limits]:
        out: list[Limits] = []
        for q in self._pools.values():
            out += [q.key.limits] * (len(q.ready) + q.making)
        return out

    def _step(self) -> bool:
        """One refill decision: make one member where a pool is short, or tear one down where
        a pool is above its target. True: something was done (look again at once)."""
        with self._cond:
            now = self.clock()
            short: list[_Pool] = []
            surplus: PoolMember | None = None
            for p in self._pools.values():
                target = self._target(p, now)
                have = len(p.ready) + p.making
                if have < target and now - p.failed_at >= FAILURE_BACKOFF_S:
                    short.append(p)
                elif len(p.ready) > target and surplus is None:
                    surplus = p.ready.pop()
            # the pool furthest below its target first
            short.sort(key=lambda q: len(q.ready) + q.making - self._target(q, now))
        if surplus is not None:
            self._destroy(surplus)
            return True
        return any(self._make_one(p) for p in short)

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Around one instance create: the refill thread yields to it (:data:`REFILL_YIELD_S`)."""
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    def _yield_to_creates(self) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._foreground == 0 or self._closing.is_set(), REFILL_YIELD_S
            )

    def run_refill(self) -> None:
        while not self._closing.is_set():
            try:
                self._yield_to_creates()
                busy = self._step()
                if not self._paused:
                    self.save_state()
            except Exception as exc:  # the thread must outlive one bad member
                log.exception("warm pool refill: %s", exc)
                busy = False
            if not busy:
                self._wake.wait(REFILL_TICK_S)
                self._wake.clear()

    def start(self) -> None:
        """Start the refill thread (once)."""
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(
                target=self.run_refill, name="tidal-instance-pools", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the refill thread; members stay (a restarted daemon keeps the whole ones)."""
        self._closing.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()  # a refill yielding to creates in flight stops waiting
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
