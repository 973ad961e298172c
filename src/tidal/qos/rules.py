"""The rules file: which cgroups are online/offline, the SLO, the policy and extra rules.

YAML, validated (through :func:`tidal.validation.convert`) into frozen values with errors that
name the file, the field and the fix;
hot-reloaded when its mtime changes (a bad edit keeps the last good rules and raises an event
instead of stopping the agent). Rule and policy types are plug-ins: any entry point in the group
``tidal.qos.rules`` whose object has ``from_params(params, where) -> Rule``.

Example::

    version: 1
    containers:
      - cgroup: shop/web
        labels: {app: web, priority: online}
        spec: {cpus: 1.0}              # optional declared quota (the value drift is measured from)
      - cgroup: batch/etl
        labels: {app: etl, priority: offline}
      - engine: {priority: offline}     # Tidal engine containers whose labels match
                                        # (`tidal run --label priority=offline`), found
                                        # through the engine daemon's API; their own labels count
    engine: {socket: /var/lib/tidal/engine/engine.sock}   # optional; default [qos] engine_socket
    classes:                            # label selectors
      online: {priority: online}
      offline: {priority: offline}
    slo: {app: web, p95_latency_ms: 250}
    policy: {type: slo_feedback, step_cores: 0.25, floor_cores: 0.2}
    rules:
      - {type: cpu_spike, threshold: 0.9}
      - {type: memory_guard}
    guards: {drift_limit_s: 600, scale_out_after_s: 60}
    signals:                            # optional: pull the p95 instead of having it pushed
      - {app: web, prometheus_url: "http://127.0.0.1:9102/metrics", metric: http_p95_seconds,
         scale_to_ms: 1000}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Protocol

import yaml

from tidal.errors import RuleError
from tidal.qos.snapshot import Advice, Priority, Slo, Snapshot
from tidal.units import parse_cpus
from tidal.validation import Bound, Fraction, NonNegativeFloat, PositiveFloat, convert

ENTRY_POINT_GROUP = "tidal.qos.rules"
DEFAULT_DRIFT_LIMIT_S = 600.0
"""Ten minutes away from the declared spec is a sizing problem, not a blip: tell the VPA."""
DEFAULT_SCALE_OUT_AFTER_S = 30.0
"""How long the SLO may stay broken with nothing left to squeeze before asking for more nodes."""
DEFAULT_LATENCY_MAX_AGE_S = 5.0


class Rule(Protocol):
    name: str

    def evaluate(self, snapshot: Snapshot) -> list[Advice]: ...


class RuleFactory(Protocol):
    def from_params(self, params: dict[str, Any], where: str) -> Rule: ...


@dataclass(frozen=True)
class ContainerRule:
    """A cgroup path (``*`` wildcards allowed), or engine containers selected by label."""

    cgroup: str
    labels: dict[str, str]
    spec_cpus: float | None = None
    engine_selector: dict[str, str] | None = None
    """Set for ``engine:`` entries (``cgroup`` is then empty): match running engine containers."""


@dataclass(frozen=True)
class LatencySignal:
    """Scrape an application's p95 from a Prometheus endpoint (instead of it being pushed)."""

    app: str
    prometheus_url: str
    metric: str
    labels: dict[str, str] = field(default_factory=dict)
    scale_to_ms: float = 1.0
    """1000 when the metric is in seconds."""


@dataclass(frozen=True)
class Guards:
    drift_limit_s: NonNegativeFloat = DEFAULT_DRIFT_LIMIT_S
    scale_out_after_s: NonNegativeFloat = DEFAULT_SCALE_OUT_AFTER_S
    latency_max_age_s: NonNegativeFloat = DEFAULT_LATENCY_MAX_AGE_S


@dataclass(frozen=True)
class RuleSet:
    containers: tuple[ContainerRule, ...]
    classes: dict[str, dict[str, str]]
    slo: Slo
    policy: Rule | None
    rules: tuple[Rule, ...]
    guards: Guards
    source: str = "<memory>"
    signals: tuple[LatencySignal, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)
    engine_socket: Path | None = None
    """From the rules' ``engine: {socket}``; ``None`` means the agent's setting."""

    @property
    def uses_engine(self) -> bool:
        return any(c.engine_selector is not None for c in self.containers)

    def priority_of(self, labels: Mapping[str, str]) -> Priority | None:
        for name in ("online", "offline"):
            selector = self.classes.get(name)
            if selector and labels_match(labels, selector):
                return name  # type: ignore[return-value]
        return None

    def all_rules(self) -> list[Rule]:
        """Policy first, then the filters: later advice refines earlier advice."""
        return ([self.policy] if self.policy else []) + list(self.rules)


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether ``labels`` has every ``key: value`` of ``selector`` (an empty one matches all)."""
    return all(labels.get(k) == v for k, v in selector.items())


def available_rule_types() -> dict[str, RuleFactory]:
    """Every registered rule/policy type, by name (built-ins come from this package's entry points)."""
    found: dict[str, RuleFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load()
    return found


def _expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise RuleError(f"{where}: {message}")


Label = str | int | float | bool
"""YAML label values; numbers and booleans become strings (``version: 2`` is label ``"2"``)."""


def _str_map(value: Mapping[str, Label] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()}


@dataclass(frozen=True)
class _SpecDoc:
    cpus: str | float | None = None


@dataclass(frozen=True)
class _ContainerDoc:
    cgroup: str | None = None
    engine: dict[str, Label] | None = None
    labels: dict[str, Label] | None = None
    spec: _SpecDoc | None = None


@dataclass(frozen=True)
class _EngineDoc:
    socket: str | None = None


_POSITIVE_MS = Bound("{key} must be a positive number of milliseconds, got {value!r}", gt=0)


@dataclass(frozen=True)
class _SloDoc:
    app: str | int | None = None
    p95_latency_ms: Annotated[float, _POSITIVE_MS] | None = None
    cpu_usage_ceiling: Fraction | None = None


@dataclass(frozen=True)
class _SignalDoc:
    app: str
    prometheus_url: str
    metric: str
    labels: dict[str, Label] | None = None
    scale_to_ms: PositiveFloat = 1.0


@dataclass(frozen=True)
class _RulesDoc:
    """The rules file as written, typed for :func:`tidal.validation.convert`."""

    version: int = 1
    containers: list[_ContainerDoc] | None = None
    classes: dict[str, dict[str, Label]] | None = None
    slo: _SloDoc | None = None
    policy: Any = None
    rules: list[Any] | None = None
    guards: Guards | None = None
    signals: list[_SignalDoc] | None = None
    engine: _EngineDoc | None = None


def _build_rule(item: Any, where: str, types: Mapping[str, RuleFactory]) -> Rule:
    _expect(
        isinstance(item, dict) and "type" in item, where, "expected a mapping with a 'type' key"
    )
    params = dict(item)
    name = str(params.pop("type"))
    if name not in types:
        raise RuleError(
            f"{where}: unknown rule type {name!r}; known: {sorted(types)} "
            f"(plug-ins register in the entry point group {ENTRY_POINT_GROUP!r})"
        )
    try:
        return types[name].from_params(params, f"{where} ({name})")
    except RuleError:
        raise
    except (TypeError, ValueError) as exc:
        raise RuleError(f"{where} ({name}): {exc}") from exc


def parse_rules(
    doc: Any, source: str = "<memory>", types: Mapping[str, RuleFactory] | None = None
) -> RuleSet:
    """Validate a decoded YAML document into a :class:`RuleSet`.

    Names and types go through :func:`tidal.validation.convert` (unknown keys at any depth,
    wrong types, missing fields); what follows are the checks no type can say.
    """
    types = available_rule_types() if types is None else types
    _expect(isinstance(doc, dict), source, "the rules file must be a YAML mapping")
    parsed = convert(doc, _RulesDoc, where=source, error=RuleError)
    _expect(parsed.version == 1, source, f"unsupported version {parsed.version!r}; use 1")

    containers: list[ContainerRule] = []
    seen: set[str] = set()
    for i, (c, raw) in enumerate(
        zip(parsed.containers or [], doc.get("containers") or [], strict=True)
    ):
        where = f"{source}: containers[{i}]"
        _expect(
            ("cgroup" in raw) != ("engine" in raw),
            where,
            "needs exactly one of 'cgroup' (a path) or 'engine' (a label selector, {} for all)",
        )
        selector = None
        cg = ""
        if "engine" in raw:
            selector = _str_map(c.engine)
        else:
            cg = (c.cgroup or "").strip("/")
            _expect(bool(cg), where, "'cgroup' must be a non-empty path")
            _expect(".." not in cg.split("/"), where, f"cgroup path {cg!r} must not contain '..'")
            _expect(cg not in seen, where, f"cgroup {cg!r} listed twice")
            seen.add(cg)
        cpus = None
        if c.spec is not None and c.spec.cpus is not None:
            try:
                cpus = parse_cpus(c.spec.cpus)
            except ValueError as exc:
                raise RuleError(f"{where}.spec.cpus: {exc}") from exc
        containers.append(ContainerRule(cg, _str_map(c.labels), cpus, selector))
    engine_socket = (
        Path(parsed.engine.socket) if parsed.engine is not None and parsed.engine.socket else None
    )

    classes_raw = parsed.classes or {
        "online": {"priority": "online"},
        "offline": {"priority": "offline"},
    }
    bad = set(classes_raw) - {"online", "offline"}
    _expect(not bad, f"{source}: classes", f"only 'online' and 'offline' exist, not {sorted(bad)}")
    classes = {k: _str_map(v) for k, v in classes_raw.items()}

    slo_doc = parsed.slo or _SloDoc()
    slo = Slo(
        app=str(slo_doc.app) if slo_doc.app is not None else None,
        p95_latency_ms=slo_doc.p95_latency_ms,
        cpu_usage_ceiling=slo_doc.cpu_usage_ceiling,
    )

    policy = None
    if parsed.policy is not None:
        policy = _build_rule(parsed.policy, f"{source}: policy", types)
    rules = tuple(
        _build_rule(r, f"{source}: rules[{i}]", types) for i, r in enumerate(parsed.rules or [])
    )

    guards = parsed.guards or Guards()
    signals = []
    for i, sig in enumerate(parsed.signals or []):
        where = f"{source}: signals[{i}]"
        url = sig.prometheus_url
        _expect(
            url.startswith(("http://", "https://")), where, f"prometheus_url {url!r} is not http(s)"
        )
        signals.append(
            LatencySignal(sig.app, url, sig.metric, _str_map(sig.labels), sig.scale_to_ms)
        )
    return RuleSet(
        tuple(containers),
        classes,
        slo,
        policy,
        rules,
        guards,
        source=source,
        signals=tuple(signals),
        raw=dict(doc),
        engine_socket=engine_socket,
    )


def load_rules(path: Path, types: Mapping[str, RuleFactory] | None = None) -> RuleSet:
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise RuleError(
            f"rules file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except FileNotFoundError:
        raise RuleError(
            f"rules file {path} does not exist; write one (start from `tidal qos rules example`)"
        ) from None
    except OSError as exc:
        raise RuleError(f"cannot read rules file {path}: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"rules file {path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise RuleError(f"rules file {path} nests too deeply") from None
    return parse_rules(doc, str(path), types)


class RulesFile:
    """The current rules, reloaded when the file changes; a bad edit keeps the last good ones."""

    def __init__(
        self,
        path: Path,
        types: Mapping[str, RuleFactory] | None = None,
        on_error: Callable[[RuleError], None] | None = None,
    ) -> None:
        self.path = path
        self.types = types
        self.on_error = on_error
        self._stamp: tuple[int, int] | None = None
        self.current: RuleSet = load_rules(path, types)
        self._stamp = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def poll(self) -> bool:
        """Reload if the file changed; True when new rules took effect."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.current = load_rules(self.path, self.types)
        except RuleError as exc:
            self.last_error = str(exc)
            if self.on_error:
                self.on_error(exc)
            return False
        self.last_error = None
        return True
