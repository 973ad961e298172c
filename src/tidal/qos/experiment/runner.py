"""The co-location experiment: an online service next to an offline batch job, on real cgroups.

Three runs of the same length, one after the other, on the same machine:

- ``alone``: the online service with its static limits, no batch job;
- ``static``: online and offline together with the static limits Kubernetes would set
  (online Guaranteed: request = limit = 1 CPU; offline Burstable: request 1 CPU, limit 2 CPUs;
  cpu.shares from the requests, CFS quota from the limits);
- ``agent``: the same static limits, with the QoS agent (SLO feedback policy) adjusting them.

The load generator is open-loop at a fixed rate and reports a rolling p95 to the agent's API,
as a service mesh or the service's own metrics would. A warm-up at the start of each run is
not measured. Latency statistics are over the measured requests; SLO attainment is the fraction
of 10 s windows whose p95 is inside the SLO; offline work is units done by the batch job during
the measured part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tidal.cgroups import CgroupFs, CgroupV1Fs, CpuLimits, detect_cgroupfs
from tidal.errors import CgroupError, ExperimentError
from tidal.proc import spawn
from tidal.qos.agent import Agent
from tidal.qos.aggregator import percentile
from tidal.qos.collector import NodeProbe
from tidal.qos.settings import QosSettings

log = logging.getLogger(__name__)
RUN_NAMES = ("alone", "static", "agent")


@dataclass(frozen=True)
class ExperimentConfig:
    duration_s: float = 120.0
    """Measured seconds per run; three runs plus set-up stay well under ten minutes."""
    warmup_s: float = 5.0
    rate_rps: float = 55.0
    work_ms: float = 15.0
    """CPU per request: 55 rps x 15 ms = 0.83 of a core, on one interpreter (one GIL), so the
    service is busy but not saturated when it has a core to itself."""
    offline_workers: int = 6
    slo_ms: float = 250.0
    window_s: float = 10.0
    online_cpus: float = 1.0
    offline_request_cpus: float = 1.0
    offline_limit_cpus: float = 2.0
    policy: str = "slo_feedback"
    policy_params: dict[str, Any] = field(default_factory=dict)
    agent_interval_s: float = 0.5
    """Faster than the agent's 1 s default: a 250 ms SLO leaves little time to react."""
    report_window_s: float = 2.0
    cgroup_root: Path = Path("/sys/fs/cgroup")
    runs: tuple[str, ...] = RUN_NAMES
    parent_shares: int = 16384
    """cpu.shares of the experiment's parent cgroup, versus 1024 per task outside it."""


def _shares(cpus: float) -> int:
    """What kubelet sets: cpu.shares = request in millicores x 1024 / 1000."""
    return max(2, int(cpus * 1024))


def _window_p95s(
    requests: list[tuple[float, float]], start: float, end: float, window_s: float
) -> list[float | None]:
    out: list[float | None] = []
    t = start
    while t + window_s <= end + 1e-9:
        lat = sorted(lat for (s, lat) in requests if t <= s < t + window_s)
        out.append(percentile(lat, 95) * 1000 if lat else None)
        t += window_s
    return out


def summarise(
    requests: list[tuple[float, float]],
    start: float,
    end: float,
    slo_ms: float,
    window_s: float,
) -> dict[str, Any]:
    """Latency percentiles and SLO window attainment of the requests sent in [start, end)."""
    lat = sorted(x for (s, x) in requests if start <= s < end)
    if not lat:
        raise ExperimentError(
            "no request completed in the measured interval; is the online service up?"
        )
    windows = _window_p95s(requests, start, end, window_s)
    ok = sum(1 for w in windows if w is not None and w <= slo_ms)
    return {
        "requests": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p95_ms": round(percentile(lat, 95) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2),
        "slo_window_attainment": round(ok / len(windows), 4) if windows else 0.0,
        "window_p95_ms": [None if w is None else round(w, 1) for w in windows],
    }


def _node_busy_s() -> float:
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class _Sampler(threading.Thread):
    """CPU use of the online and offline cgroups and offline progress, twice a second."""

    def __init__(self, fs: CgroupFs, cgroups: dict[str, str], progress_file: Path | None) -> None:
        super().__init__(name="qos-exp-sampler", daemon=True)
        self.fs, self.cgroups, self.progress_file = fs, cgroups, progress_file
        self.samples: list[dict[str, float]] = []
        self._stop_evt = threading.Event()

    def units(self) -> float:
        if self.progress_file is None:
            return 0.0
        try:
            return float(json.loads(self.progress_file.read_text())["units"])
        except (OSError, ValueError, KeyError):
            return float("nan")

    def run(self) -> None:
        while not self._stop_evt.is_set():
            row = {"t": time.monotonic(), "units": self.units(), "node": _node_busy_s()}
            for name, cg in self.cgroups.items():
                with contextlib.suppress(CgroupError):
                    row[name] = self.fs.cpu_stats(cg).usage_ns / 1e9
            self.samples.append(row)
            self._stop_evt.wait(0.5)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)


def _spawn(args: list[str], procs_files: list[Path], log_file: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tidal.qos.experiment.workloads"]
    for f in procs_files:
        cmd += ["--cgroup-procs", str(f)]
    # Workloads run for the whole experiment, side by side: spawned children, not runs.
    with log_file.open("ab") as fh:
        return spawn(
            cmd + args,
            what=f"starting workload {args[0] if args else ''}",
            error=ExperimentError,
            stdout=fh,
            stderr=fh,
        )


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill_cgroup(fs: CgroupFs, cgroup: str) -> None:
    """SIGKILL whatever is left in the cgroup (children of a crashed workload)."""
    for _ in range(50):
        try:
            pids = fs.pids(cgroup)
        except CgroupError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def experiment_fs(root: Path) -> CgroupFs:
    """The hierarchy for the experiment; on v1 only cpu and cpuacct (memory stays untouched)."""
    fs = detect_cgroupfs(root)
    if isinstance(fs, CgroupV1Fs):
        return CgroupV1Fs(root, tuple(c for c in ("cpu", "cpuacct") if c in fs.controllers))
    return fs


def _rules_yaml(parent: str, cfg: ExperimentConfig) -> str:
    doc = {
        "version": 1,
        "containers": [
            {"cgroup": f"{parent}/online", "labels": {"app": "online", "priority": "online"}},
            {"cgroup": f"{parent}/offline", "labels": {"app": "batch", "priority": "offline"}},
        ],
        "slo": {"app": "online", "p95_latency_ms": cfg.slo_ms},
        "policy": {"type": cfg.policy, **cfg.policy_params},
        "guards": {"latency_max_age_s": 5, "drift_limit_s": 600, "scale_out_after_s": 30},
    }
    return json.dumps(doc)  # JSON is YAML


def run_one(
    name: str,
    cfg: ExperimentConfig,
    workdir: Path,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One run; returns its R object (statistics, offline work, a per-second timeline)."""
    fs = experiment_fs(cfg.cgroup_root)
    parent = f"tidal-qos-exp-{os.getpid()}"
    cg = {k: f"{parent}/{k}" for k in ("online", "offline", "system")}
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_file = run_dir / "offline.json"
    procs: list[subprocess.Popen[bytes]] = []
    agent = None
    sampler = None
    try:
        fs.create(parent)
        # The experiment's node is this parent cgroup, weighted like kubelet's kubepods slice
        # (shares ~ allocatable CPU): other work on a shared machine then disturbs it less.
        fs.write_cpu(parent, CpuLimits(shares=cfg.parent_shares))
        for c in cg.values():
            fs.create(c)
        fs.write_cpu(
            cg["online"], CpuLimits.from_cores(cfg.online_cpus, shares=_shares(cfg.online_cpus))
        )
        fs.write_cpu(
            cg["offline"],
            CpuLimits.from_cores(cfg.offline_limit_cpus, shares=_shares(cfg.offline_request_cpus)),
        )
        fs.write_cpu(cg["system"], CpuLimits(shares=4096))  # the client is not under test
        ready = run_dir / "ready"
        procs.append(
            _spawn(
                [
                    "online",
                    "--port",
                    "0",
                    "--work-ms",
                    str(cfg.work_ms),
                    "--ready-file",
                    str(ready),
                ],
                fs.procs_files(cg["online"]),
                run_dir / "online.log",
            )
        )
        deadline = time.monotonic() + 15
        while not ready.exists() or not ready.read_text():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise ExperimentError(f"online service did not start; see {run_dir / 'online.log'}")
            time.sleep(0.05)
        port = int(ready.read_text())
        if name != "alone":
            procs.append(
                _spawn(
                    ["offline", "--workers", str(cfg.offline_workers), "--out", str(progress_file)],
                    fs.procs_files(cg["offline"]),
                    run_dir / "offline.log",
                )
            )
        report_url = None
        if name.startswith("agent"):
            (run_dir / "rules.yaml").write_text(_rules_yaml(parent, cfg))
            settings = QosSettings(
                interval_s=cfg.agent_interval_s,
                api_port=0,
                rules_file=run_dir / "rules.yaml",
                state_dir=run_dir / "state",
                cgroup_root=cfg.cgroup_root,
            )
            agent = Agent(
                settings,
                fs=fs,
                node_probe=NodeProbe(disk_probe_dir=run_dir / "state", required_interfaces=("lo",)),
            )
            agent.start()
            assert agent.api_address is not None
            host, aport = agent.api_address
            report_url = f"http://{host}:{aport}/v1/signals/latency"
        sampler = _Sampler(
            fs,
            {"online": cg["online"], "offline": cg["offline"]},
            progress_file if name != "alone" else None,
        )
        sampler.start()
        total = cfg.warmup_s + cfg.duration_s
        lg_args = [
            "loadgen",
            "--port",
            str(port),
            "--rate",
            str(cfg.rate_rps),
            "--duration",
            str(total),
            "--out",
            str(run_dir / "loadgen.json"),
            "--app",
            "online",
            "--window",
            str(cfg.report_window_s),
            "--report-every",
            str(cfg.agent_interval_s),
        ]
        if report_url:
            lg_args += ["--report-url", report_url]
        progress(f"run {name}: {total:.0f}s at {cfg.rate_rps:g} rps")
        t0 = time.monotonic()
        lg = _spawn(lg_args, fs.procs_files(cg["system"]), run_dir / "loadgen.log")
        procs.append(lg)
        try:
            rc = lg.wait(timeout=total + 60)
        except subprocess.TimeoutExpired as exc:
            raise ExperimentError(
                f"load generator of run {name} did not finish; see {run_dir}"
            ) from exc
        if rc != 0:
            raise ExperimentError(
                f"load generator of run {name} failed (exit {rc}); see {run_dir / 'loadgen.log'}"
            )
        sampler.stop()
        requests = [
            (float(s), float(x))
            for s, x in json.loads((run_dir / "loadgen.json").read_text())["requests"]
        ]
        result = summarise(requests, cfg.warmup_s, total, cfg.slo_ms, cfg.window_s)
        result.update(_offline_and_timeline(sampler.samples, t0, cfg, requests, total))
        if agent is not None:
            result["agent"] = {
                "policy": cfg.policy,
                "adjustments": dict(agent.executor.counts),
                "events": [e.to_dict() for e in agent.center.events],
            }
        return result
    finally:
        if sampler is not None:
            sampler.stop()
        if agent is not None:
            problems = agent.stop()
            if problems:
                log.error("qos experiment: agent restore problems: %s", problems)
        for p in reversed(procs):
            _stop(p)
        for c in cg.values():
            _kill_cgroup(fs, c)
        with contextlib.suppress(CgroupError):
            fs.remove(parent)


def _offline_and_timeline(
    samples: list[dict[str, float]],
    t0: float,
    cfg: ExperimentConfig,
    requests: list[tuple[float, float]],
    total: float,
) -> dict[str, Any]:
    rel = [dict(s, t=s["t"] - t0) for s in samples]
    # Progress readings can be missing (file not written yet): use only samples that have one.
    measured = [s for s in rel if cfg.warmup_s <= s["t"] <= total and s["units"] == s["units"]]
    out: dict[str, Any] = {}
    if len(measured) >= 2:
        a, b = measured[0], measured[-1]
        dt = b["t"] - a["t"]
        units = b["units"] - a["units"]
        scale = cfg.duration_s / dt if dt > 0 else 1.0  # the sampler's edges are 0.5 s coarse
        out["offline_work"] = round(units * scale) if units == units else 0
        out["offline_work_per_s"] = round(units / dt, 1) if dt > 0 and units == units else 0.0
        out["online_cpu_cores"] = round((b.get("online", 0) - a.get("online", 0)) / dt, 3)
        out["offline_cpu_cores"] = round((b.get("offline", 0) - a.get("offline", 0)) / dt, 3)
        node = (b["node"] - a["node"]) / dt
        # CPU used outside the online and offline cgroups: the load generator, the agent, and
        # whatever else runs on the machine (noise the run could not control).
        out["other_cpu_cores"] = round(
            max(0.0, node - out["online_cpu_cores"] - out["offline_cpu_cores"]), 3
        )
    else:
        out.update(
            offline_work=0, offline_work_per_s=0.0, online_cpu_cores=0.0, offline_cpu_cores=0.0
        )
    timeline: dict[str, list[float | None]] = {
        "t": [],
        "p95_ms": [],
        "offline_cores": [],
        "online_cores": [],
    }
    for sec in range(int(total)):
        lat = sorted(x for s, x in requests if sec <= s < sec + 1)
        win = [s for s in rel if sec <= s["t"] < sec + 1.01]
        timeline["t"].append(float(sec))
        timeline["p95_ms"].append(round(percentile(lat, 95) * 1000, 1) if lat else None)
        for key in ("offline", "online"):
            vals = [s[key] for s in win if key in s]
            if len(win) >= 2 and len(vals) >= 2:
                dt = win[-1]["t"] - win[0]["t"]
                timeline[f"{key}_cores"].append(
                    round((vals[-1] - vals[0]) / dt, 3) if dt > 0 else None
                )
            else:
                timeline[f"{key}_cores"].append(None)
    out["timeline"] = timeline
    return out


def run_experiment(
    cfg: ExperimentConfig, progress: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """All runs; the result has the issue's shape: ``{"slo_ms": ..., "runs": {name: R}}``."""
    if os.geteuid() != 0:
        raise ExperimentError("the experiment writes cgroups and needs root; run it with sudo")

    def interrupted(signum: int, frame: object) -> None:
        raise ExperimentError(f"experiment interrupted by signal {signum}; cgroups cleaned up")

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, interrupted) if main else None
    try:
        with tempfile.TemporaryDirectory(prefix="tidal-qos-exp-") as tmp:
            runs = {name: run_one(name, cfg, Path(tmp), progress) for name in cfg.runs}
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    for r in runs.values():
        r["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {"slo_ms": cfg.slo_ms, "runs": runs}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: agent p95 inside the SLO in >= 95 % of windows, offline >= 60 % of static."""
    runs = result["runs"]
    if "agent" not in runs or "static" not in runs:
        return {}
    static_work = runs["static"]["offline_work"] or 1
    ratio = runs["agent"]["offline_work"] / static_work
    att = runs["agent"]["slo_window_attainment"]
    return {
        "agent_slo_window_attainment": att,
        "agent_offline_vs_static": round(ratio, 3),
        "met": att >= 0.95 and ratio >= 0.6,
    }
