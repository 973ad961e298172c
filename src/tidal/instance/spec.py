"""What ``tidal instance run`` asks for: frozen values, the CLI forms' parsers, JSON.

An instance is a pod: one sandbox (infra container holding the network, IPC and UTS
namespaces) and its containers, each with its own rootfs, command, env and restart policy,
all under one cgroup that carries the pod-level limits (:class:`Limits`). Limits come from a
named instance type (:mod:`tidal.instance.catalog`), chosen from a fallback list by free
capacity (:mod:`tidal.instance.capacity`), with ad-hoc values laid over it.

Everything here is a plain value that travels as JSON from the CLI to the daemon and is stored
as JSON in the instance's record; parsing raises :class:`ConfigError` naming the bad text.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from tidal.engine.spec import RESTART_POLICIES, PortMapping, VolumeSpec
from tidal.errors import ConfigError
from tidal.units import parse_size

MAIN = "main"
"""Name of the instance's main container (the one the command after ``--`` runs in)."""
INSTANCE_RUNTIMES = ("runc", "runsc")
"""runc for single tenants; runsc (gVisor) as the multi-tenant sandbox."""
PULL_POLICIES = ("missing", "always", "never")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,40}$")
"""Instance and member names: container names are ``<instance>.<member>`` (at most 63)."""
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:bit|bps|b)?\s*$")
_RATE_MULT = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


@dataclass(frozen=True)
class Limits:
    """Pod-level limits, each enforced by the kernel; None: not limited.

    CPU in cores, memory in bytes, bandwidth in bits per second (as tc and network links count
    it), packets per second, disk throughput in bytes per second and operations per second.
    """

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    egress_bps: int | None = None
    ingress_bps: int | None = None
    egress_pps: int | None = None
    ingress_pps: int | None = None
    disk_read_bps: int | None = None
    disk_write_bps: int | None = None
    disk_read_iops: int | None = None
    disk_write_iops: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value <= 0:
                raise ConfigError(f"instance limit {f.name} must be positive, got {value!r}")
        if self.memory_bytes is not None and self.memory_bytes < 8 * 1024 * 1024:
            raise ConfigError(f"instance memory {self.memory_bytes} bytes is below 8 MiB")

    def over(self, base: Limits) -> Limits:
        """These values where set, ``base``'s elsewhere (ad-hoc values over a type's)."""
        return Limits(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(base, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"instance limits have unknown field(s) {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class InstanceType:
    """A named shape, e.g. ``2c4g``: the limits an instance of that type gets."""

    name: str
    limits: Limits

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "limits": self.limits.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceType:
        return cls(str(data["name"]), Limits.from_json(dict(data.get("limits") or {})))


@dataclass(frozen=True)
class MemberSpec:
    """One container of the pod besides the main one: its own image, command, env, restart."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    restart: str = "no"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"container name {self.name!r} in the instance is invalid; use letters, digits, "
                "'_' or '-' (at most 41)"
            )
        if not self.image:
            raise ConfigError(f"container {self.name!r} of the instance needs an image")
        if self.restart not in RESTART_POLICIES:
            raise ConfigError(
                f"container {self.name!r}: unknown restart policy {self.restart!r}; "
                f"use {', '.join(RESTART_POLICIES)}"
            )


@dataclass(frozen=True)
class InstanceSpec:
    """Everything ``tidal instance run`` asks for."""

    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    members: tuple[MemberSpec, ...] = ()
    specs: tuple[str, ...] = ()
    """Instance types in fallback order: the first the node's free capacity holds is taken."""
    limits: Limits = field(default_factory=Limits)
    """Ad-hoc values (``--cpus``, ``--memory``, ``--bandwidth`` ...), laid over the type's."""
    runtime: str | None = None
    ports: tuple[PortMapping, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """For every container of the instance."""
    volumes: tuple[VolumeSpec, ...] = ()
    """The main container's volumes."""
    labels: tuple[tuple[str, str], ...] = ()
    restart: str = "no"
    """The main container's restart policy."""
    remove_on_exit: bool = False
    """``--rm``: remove the instance once its main container has exited."""
    pull: str | None = None
    """Image pull policy, passed through to the engine unchanged (missing, always, never)."""

    def __post_init__(self) -> None:
        if not self.image:
            raise ConfigError("an instance needs an image (a Tidal image or rootfs directory)")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ConfigError(
                f"instance name {self.name!r} is invalid; use letters, digits, '_' or '-' "
                "(at most 41, starting with a letter or digit)"
            )
        if self.runtime is not None and self.runtime not in INSTANCE_RUNTIMES:
            raise ConfigError(
                f"unknown runtime {self.runtime!r} for an instance; "
                f"choose {' or '.join(INSTANCE_RUNTIMES)}"
            )
        if self.pull is not None and self.pull not in PULL_POLICIES:
            raise ConfigError(f"--pull {self.pull!r}: choose one of {', '.join(PULL_POLICIES)}")
        if self.restart not in RESTART_POLICIES:
            raise ConfigError(f"unknown restart policy {self.restart!r}; use {RESTART_POLICIES}")
        names = [m.name for m in self.members]
        for n in names:
            if n in (MAIN, "sandbox"):
                raise ConfigError(f"--container {n}=...: 'main' and 'sandbox' are taken")
        if len(set(names)) != len(names):
            raise ConfigError(f"two containers of the instance share a name: {names}")
        seen: set[int] = set()
        for p in self.ports:
            if p.host_port in seen:
                raise ConfigError(f"host port {p.host_port} is published twice")
            seen.add(p.host_port)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["limits"] = self.limits.to_json()
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"instance spec has unknown field(s) {sorted(unknown)}")
        d = dict(data)
        pairs = ("env", "labels")
        for key in pairs:
            d[key] = tuple((str(k), str(v)) for k, v in d.get(key, ()))
        d["command"] = tuple(d.get("command", ()))
        d["specs"] = tuple(d.get("specs", ()))
        d["limits"] = Limits.from_json(dict(d.get("limits") or {}))
        d["ports"] = tuple(PortMapping(**p) for p in d.get("ports", ()))
        d["volumes"] = tuple(VolumeSpec(**v) for v in d.get("volumes", ()))
        d["members"] = tuple(
            MemberSpec(
                name=m["name"],
                image=m["image"],
                command=tuple(m.get("command", ())),
                env=tuple((str(k), str(v)) for k, v in m.get("env", ())),
                restart=m.get("restart", "no"),
            )
            for m in d.get("members", ())
        )
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"instance spec is malformed: {exc}") from exc


# --- parsers for CLI forms ------------------------------------------------------------------


def parse_rate(text: str, what: str = "--bandwidth") -> int:
    """Bits per second: ``5M`` = 5 Mbit/s, ``100k``, ``1G``, ``2.5mbit`` (SI multiples, as tc)."""
    m = _RATE_RE.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r}: expected a rate in bits/s such as 5M, 100k or 1G")
    value = int(float(m.group(1)) * _RATE_MULT[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"{what} {text!r} must be positive")
    return value


def parse_count(text: str, what: str) -> int:
    """A positive count with an optional SI multiple: ``20000``, ``20k``."""
    try:
        return parse_rate(text, what)
    except ConfigError:
        raise ConfigError(
            f"{what} {text!r}: expected a positive count such as 5000 or 20k"
        ) from None


def parse_bytes_rate(text: str, what: str) -> int:
    """Bytes per second, binary multiples as ``--memory``: ``50M`` = 50 MiB/s."""
    value = parse_size(text)
    if value <= 0:
        raise ConfigError(f"{what} {text!r} must be positive")
    return value


def parse_member(text: str) -> MemberSpec:
    """``NAME[:RESTART]=IMAGE[:COMMAND]`` (``RESTART``: no, on-failure, always).

    An image reference may hold ``:`` itself (``127.0.0.1:5000/web:v1``), so the command starts
    at the first ``:`` followed by what a port or tag cannot be: text holding a space before the
    next ``:``, or an absolute path (a one-word command is given by its absolute path). The
    command is split by shell rules.
    """
    head, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(f"--container {text!r}: expected NAME[:RESTART]=IMAGE[:COMMAND]")
    name, _, restart = head.partition(":")
    image, command = rest, ""
    for i, ch in enumerate(rest):
        if ch == ":" and i > 0:
            tail = rest[i + 1 :]
            segment = tail.split(":", 1)[0]  # up to the next ':', as a port or tag would be
            if tail.startswith("/") or " " in segment.strip():
                image, command = rest[:i], tail
                break
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise ConfigError(f"--container {text!r}: the command does not parse: {exc}") from None
    return MemberSpec(name=name, image=image, command=argv, restart=restart or "no")


def parse_spec_list(text: str | None) -> tuple[str, ...]:
    """``2c2g,2c4g,4c8g``: instance types in fallback order."""
    if not text:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    if any(not n for n in names):
        raise ConfigError(f"--spec {text!r}: expected TYPE[,TYPE...] such as 2c2g,2c4g")
    return names
