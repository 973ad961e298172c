"""The node QoS agent: collector -> aggregator -> command center -> executor, every interval.

:meth:`Agent.step` is one round and is what tests call; :meth:`Agent.start` runs rounds in a
thread, serves the HTTP API and spawns the watchdog; :meth:`Agent.stop` restores every cgroup
(or, with ``handover=True``, leaves them for the next agent to re-adopt).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidal.cgroups import CgroupFs, detect_cgroupfs, expand_cgroups
from tidal.errors import CgroupError, QosError, RuleError
from tidal.qos.aggregator import Aggregator, SlidingWindow
from tidal.qos.api import ApiServer
from tidal.qos.collector import Collector, Frame, Health, NodeProbe, NodeSource, judge_health
from tidal.qos.command_center import CommandCenter, Decision
from tidal.qos.discovery import EngineDiscovery
from tidal.qos.executor import Executor
from tidal.qos.metrics import QosMetrics
from tidal.qos.rules import ContainerRule, RuleSet, RulesFile, labels_match
from tidal.qos.scrape import Fetch, http_fetch, parse_metric
from tidal.qos.settings import QosSettings
from tidal.qos.snapshot import ContainerView, Event, Snapshot
from tidal.qos.watchdog import spawn_watchdog, stop_watchdog

log = logging.getLogger(__name__)
SLO_ATTAINMENT_WINDOW_S = 60.0


@dataclass(frozen=True)
class LatencyReport:
    app: str
    p95_ms: float
    t: float


class Agent:
    def __init__(
        self,
        settings: QosSettings,
        *,
        fs: CgroupFs | None = None,
        node_probe: NodeSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rules: RulesFile | None = None,
        fetch: Fetch = http_fetch,
    ) -> None:
        self.settings = settings
        self.fs = fs or detect_cgroupfs(settings.cgroup_root)
        self.clock = clock
        self.wall_clock = wall_clock
        state_dir = settings.resolved_state_dir()
        self.metrics = QosMetrics()
        self.rules = rules or RulesFile(settings.resolved_rules_file(), on_error=self._rules_error)
        if self.rules.on_error is None:
            self.rules.on_error = self._rules_error
        self.collector = Collector(
            self.fs, node_probe or NodeProbe(disk_probe_dir=state_dir), clock=clock
        )
        self.aggregator = Aggregator()
        self.executor = Executor(self.fs, state_dir)
        self.center = CommandCenter(self.executor, on_event=self._on_event)
        self._latency: dict[str, LatencyReport] = {}
        self._slo_ok: dict[str, SlidingWindow] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: Any = None
        self._api: ApiServer | None = None
        self.rounds = 0
        self.last_error: str | None = None
        self.fetch = fetch
        self.scrape_errors: dict[str, str] = {}
        self._discovery: EngineDiscovery | None = None
        self.engine_names: dict[str, str] = {}
        """cgroup -> engine container name, for status and logs."""
        self._watched: list[tuple[str, ContainerRule]] = []

    def discovery(self, rules: RuleSet) -> EngineDiscovery:
        """The engine client for ``engine:`` entries (re-made when the rules move the socket)."""
        socket = rules.engine_socket or self.settings.resolved_engine_socket()
        if self._discovery is None or self._discovery.socket_path != socket:
            if self._discovery is not None:
                self._discovery.close()
            self._discovery = EngineDiscovery(socket)
        return self._discovery

    # --- events and signals ---------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        self.metrics.events.labels(event.kind).inc()

    def _rules_error(self, exc: RuleError) -> None:
        self.center.emit(
            Event(
                "rules",
                f"rules reload rejected, keeping the previous rules: {exc}",
                str(self.rules.path),
            )
        )

    def report_latency(self, app: str, p95_ms: float) -> None:
        """Ingest an application latency signal (pushed by the service, a probe or a scraper)."""
        if not p95_ms >= 0:
            raise QosError(
                f"latency report for {app!r}: p95_ms must be a non-negative number, got {p95_ms!r}"
            )
        now = self.clock()
        with self._lock:
            self._latency[app] = LatencyReport(app, float(p95_ms), now)
            self.aggregator.add(f"latency:{app}", now, float(p95_ms))
        self.metrics.latency.labels(app).set(p95_ms)

    def scrape(self, rules: RuleSet) -> None:
        """Pull the latency signals the rules name; a failed scrape only leaves the value stale."""
        for sig in rules.signals:
            try:
                value = parse_metric(self.fetch(sig.prometheus_url), sig.metric, sig.labels)
            except QosError as exc:
                self.scrape_errors[sig.app] = str(exc)
                continue
            if value is None:
                self.scrape_errors[sig.app] = (
                    f"no sample {sig.metric}{sig.labels} at {sig.prometheus_url}"
                )
                continue
            self.scrape_errors.pop(sig.app, None)
            self.report_latency(sig.app, value * sig.scale_to_ms)

    def _fresh_latency(self, now: float, max_age_s: float) -> dict[str, float]:
        return {a: r.p95_ms for a, r in self._latency.items() if now - r.t <= max_age_s}

    # --- one round ------------------------------------------------------------------------------

    def targets(self, rules: RuleSet) -> list[tuple[str, ContainerRule]]:
        """The watched cgroups: rules' paths with wildcards expanded and engine containers that
        match a selector (with their own labels under the rule's); the first rule wins."""
        out: dict[str, ContainerRule] = {}
        names: dict[str, str] = {}
        engine = self.discovery(rules).containers() if rules.uses_engine else []
        for c in rules.containers:
            if c.engine_selector is not None:
                for ec in engine:
                    if labels_match(ec.labels, c.engine_selector):
                        labels = {**ec.labels, **c.labels}
                        out.setdefault(ec.cgroup, ContainerRule(ec.cgroup, labels, c.spec_cpus))
                        names.setdefault(ec.cgroup, ec.name)
                continue
            try:
                paths = expand_cgroups(self.fs, c.cgroup)
            except CgroupError as exc:
                log.info("qos: cannot expand %s: %s", c.cgroup, exc)
                continue
            for cg in paths:
                out.setdefault(cg, c)
        self.engine_names = names
        return list(out.items())

    def _snapshot(
        self, frame: Frame, rules: RuleSet, targets: list[tuple[str, ContainerRule]]
    ) -> Snapshot:
        views = []
        for cgroup, c in targets:
            m = frame.containers.get(cgroup)
            if m is None:
                continue
            baseline = self.executor.baseline(cgroup).cpu
            if c.spec_cpus is not None:
                baseline = baseline.from_cores(
                    c.spec_cpus,
                    period_us=baseline.period_us,
                    shares=baseline.shares,
                    burst_us=baseline.burst_us,
                    idle=baseline.idle,
                )
            prof = self.aggregator.profile(cgroup, frame.t)
            w1 = prof.windows.get("1m") if prof else None
            views.append(
                ContainerView(
                    cgroup=cgroup,
                    labels=c.labels,
                    priority=rules.priority_of(c.labels),
                    app=c.labels.get("app"),
                    metrics=m,
                    baseline=baseline,
                    cpu_ewma=prof.ewma if prof else None,
                    cpu_p95_1m=w1.p95 if w1 else None,
                )
            )
        return Snapshot(
            t=frame.t,
            node=frame.node,
            containers=tuple(views),
            slo=rules.slo,
            latency_p95_ms=self._fresh_latency(frame.t, rules.guards.latency_max_age_s),
        )

    def observe(self) -> tuple[Snapshot, RuleSet, Health]:
        """Collect and aggregate, without acting."""
        if self.rules.poll():
            self.center.emit(Event("rules", "rules reloaded", str(self.rules.path)))
        rules = self.rules.current
        self.scrape(rules)
        targets = self.targets(rules)
        self._watched = targets
        frame = self.collector.collect([cg for cg, _ in targets])
        self.metrics.observe_frame(frame)
        cpu = {cg: m.cpu_cores for cg, m in frame.containers.items() if m.cpu_cores is not None}
        apps = {cg: c.labels.get("app", "") for cg, c in targets}
        self.aggregator.ingest(frame.t, cpu, apps)
        with self._lock:
            snapshot = self._snapshot(frame, rules, targets)
        health = judge_health(frame.node, self.clock(), self.settings.stale_after_s)
        if frame.errors:
            missing = "; ".join(f"{cg}: {e}" for cg, e in frame.errors.items())
            log.info("qos: skipped cgroups: %s", missing)
        return snapshot, rules, health

    def step(self) -> Decision:
        for cgroup in self.executor.forget_vanished():
            log.info("qos: %s is gone (container removed); dropped from the journal", cgroup)
        snapshot, rules, health = self.observe()
        self.metrics.healthy.set(1 if health.ok else 0)
        before = len(self.executor.history)
        decision = self.center.round(snapshot, rules, health)
        for adj in list(self.executor.history)[before:]:
            self.metrics.adjustments.labels(adj.cgroup, "ok" if adj.ok else "rolled_back").inc()
        self._track_slo(snapshot)
        self.rounds += 1
        return decision

    def dry_run(self) -> Decision:
        """What the next round would do, without doing it."""
        snapshot, rules, health = self.observe()
        return self.center.decide(snapshot, rules, health)

    def _track_slo(self, snapshot: Snapshot) -> None:
        slo = snapshot.slo.p95_latency_ms
        if slo is None:
            return
        for app, p95 in snapshot.latency_p95_ms.items():
            w = self._slo_ok.setdefault(app, SlidingWindow(SLO_ATTAINMENT_WINDOW_S))
            w.add(snapshot.t, 1.0 if p95 <= slo else 0.0)
            stats = w.stats(snapshot.t)
            if stats:
                self.metrics.attainment.labels(app).set(stats.mean)

    # --- lifecycle ------------------------------------------------------------------------------

    def recover(self, mode: str = "restore") -> None:
        """Deal with a journal left by a previous agent: ``restore`` it or ``adopt`` it."""
        if not self.executor.journal.entries:
            return
        if mode == "adopt":
            adopted, dropped = self.executor.adopt()
            self.center.emit(
                Event("adopt", f"re-adopted {adopted}, dropped overwritten {dropped}", "journal")
            )
        else:
            problems = self.executor.restore_all()
            self.center.emit(
                Event(
                    "restore",
                    f"restored values left by a previous agent; problems: {problems or 'none'}",
                    "journal",
                )
            )

    def start(self, *, serve_api: bool = True, recover: str = "restore") -> None:
        if serve_api:  # bind first: a taken port fails before anything else has started
            self._api = ApiServer(
                self, self.settings.api_host, self.settings.api_port, self.metrics.registry
            )
        self.recover(recover)
        self.executor.journal.save("running")
        if self.settings.watchdog:
            self._watchdog = spawn_watchdog(self.settings.resolved_state_dir(), self.fs)
        if self._api is not None:
            self._api.start()
        self._thread = threading.Thread(target=self._loop, name="qos-agent", daemon=True)
        self._thread.start()

    @property
    def api_address(self) -> tuple[str, int] | None:
        return self._api.address if self._api else None

    def _loop(self) -> None:
        next_t = self.clock()
        while not self._stop.is_set():
            try:
                self.step()
                self.last_error = None
            except Exception as exc:  # one bad round must not kill the agent
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:  # log a persistent fault once, not every second
                    log.exception("qos: round failed")
                self.last_error = message
            next_t += self.settings.interval_s
            self._stop.wait(max(0.0, next_t - self.clock()))

    def stop(self, *, handover: bool = False) -> list[str]:
        """Stop the loop and API; restore every cgroup unless handing over to a successor."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self._api:
            self._api.stop()
        problems: list[str] = []
        if handover:
            self.executor.journal.save("handover")
        else:
            problems = self.executor.restore_all()
            if not self.executor.journal.entries:
                self.executor.journal.delete()
        if self._watchdog is not None:
            stop_watchdog(self._watchdog)
        if self._discovery is not None:
            self._discovery.close()
        return problems

    # --- what the API serves (qos.api.StatusProvider) ----------------------------------------

    def profiles(self) -> dict[str, Any]:
        now = self.clock()
        out = {}
        for key in self.aggregator.keys():  # noqa: SIM118 (a method, not a dict)
            p = self.aggregator.profile(key, now)
            if p:
                out[key] = p.to_dict()
        return out

    def adjustments(self) -> dict[str, Any]:
        return {
            "active": self.executor.journal.entries,
            "history": [x.to_dict() for x in list(self.executor.history)[-200:]],
        }

    def rules_doc(self) -> dict[str, Any]:
        return {
            "file": str(self.rules.path),
            "error": self.rules.last_error,
            "rules": self.rules.current.raw,
        }

    def events(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.center.events]

    def dry_run_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.dry_run().to_dict()
        return doc

    def health_problem(self) -> str | None:
        """Failing while the round loop is dead or every round has been failing."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the agent's round loop has stopped"
        if self.last_error is not None:
            return f"the last round failed: {self.last_error}"
        return None

    def status(self) -> dict[str, Any]:
        d = self.center.last_decision
        return {
            "rounds": self.rounds,
            "cgroup_version": self.fs.version,
            "healthy": d.health.ok if d else None,
            "health_reasons": list(d.health.reasons) if d else [],
            "rules_file": str(self.rules.path),
            "rules_error": self.rules.last_error,
            "policy": getattr(self.rules.current.policy, "name", None),
            "latency_p95_ms": {a: r.p95_ms for a, r in self._latency.items()},
            "watched": [
                {
                    "cgroup": cg,
                    "container": self.engine_names.get(cg),
                    "priority": self.rules.current.priority_of(c.labels),
                }
                for cg, c in self._watched
            ],
            "journal": sorted(self.executor.journal.entries),
            "adjustments": dict(self.executor.counts),
            "last_error": self.last_error,
            "scrape_errors": dict(self.scrape_errors),
            "engine_error": self._discovery.last_error if self._discovery else None,
            "state_dir": str(Path(self.executor.journal.path).parent),
        }
