from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidal.errors import ConfigError, RuleError
from tidal.qos.policies import SloFeedback
from tidal.qos.rules import RulesFile, available_rule_types, load_rules, parse_rules
from tidal.qos.snapshot import Advice, Snapshot


def test_builtin_types_are_entry_points() -> None:
    types = available_rule_types()
    assert {"utilisation_budget", "slo_feedback", "cpu_spike", "memory_guard"} <= set(types)


def test_parse_example(rules_path: Path) -> None:
    rs = load_rules(rules_path)
    assert [c.cgroup for c in rs.containers] == ["shop/web", "batch/etl"]
    assert rs.priority_of({"priority": "online", "app": "web"}) == "online"
    assert rs.priority_of({"priority": "offline"}) == "offline"
    assert rs.priority_of({"app": "x"}) is None
    assert rs.slo.p95_latency_ms == 250 and rs.slo.app == "web"
    assert isinstance(rs.policy, SloFeedback) and rs.policy.step_cores == 0.25
    assert rs.guards.drift_limit_s == 30
    assert [r.name for r in rs.all_rules()] == ["slo_feedback", "memory_guard"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"policy": {"type": "nope"}}, "unknown rule type 'nope'"),
        ({"policy": {"type": "slo_feedback", "step": 1}}, r"unknown parameter\(s\) \['step'\]"),
        ({"policy": {"type": "slo_feedback", "step_cores": "big"}}, "step_cores must be float"),
        ({"policy": {"type": "slo_feedback", "tighten_at": 0.1}}, "loosen_below < tighten_at"),
        ({"containers": [{"labels": {}}]}, r"containers\[0\]: needs exactly one of 'cgroup'"),
        ({"containers": [{"cgroup": "a", "engine": {}}]}, "needs exactly one of"),
        ({"containers": [{"engine": ["app"]}]}, r"containers\[0\].engine: expected a mapping"),
        ({"containers": [{"cgroup": "a", "cpus": 1}]}, r"unknown key\(s\) \['cpus'\]"),
        ({"engine": {"sock": "/x"}}, r"engine: unknown key\(s\) \['sock'\]"),
        ({"containers": [{"cgroup": "a"}, {"cgroup": "a/"}]}, "listed twice"),
        ({"containers": [{"cgroup": "../etc"}]}, "must not contain '..'"),
        ({"containers": [{"cgroup": "a", "spec": {"cpus": "lots"}}]}, "spec.cpus"),
        ({"slo": {"p95_latency_ms": -1}}, "positive number"),
        ({"classes": {"gold": {}}}, "only 'online' and 'offline'"),
        ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
        ({"guards": {"drift": 1}}, "guards"),
        ([], "must be a YAML mapping"),
    ],
)
def test_validation_errors_name_the_field(doc: Any, message: str) -> None:
    with pytest.raises(RuleError, match=message) as info:
        parse_rules(doc, "rules.yaml")
    assert str(info.value).startswith("rules.yaml")
    assert isinstance(info.value, ConfigError)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(p)
    p.write_text("a: [unclosed")
    with pytest.raises(RuleError, match="not valid YAML"):
        load_rules(p)


def test_hot_reload_and_bad_edit_keeps_last_good(rules_path: Path) -> None:
    errors: list[str] = []
    rf = RulesFile(rules_path, on_error=lambda e: errors.append(str(e)))
    assert rf.poll() is False
    doc = yaml.safe_load(rules_path.read_text())
    doc["policy"] = {"type": "utilisation_budget", "threshold": 0.5}
    rules_path.write_text(yaml.safe_dump(doc))
    os.utime(rules_path, ns=(1, 1))  # a distinct mtime even on coarse clocks
    assert rf.poll() is True
    assert rf.current.policy is not None and rf.current.policy.name == "utilisation_budget"
    rules_path.write_text("policy: {type: bogus}\n")
    os.utime(rules_path, ns=(2, 2))
    assert rf.poll() is False
    assert rf.current.policy.name == "utilisation_budget"
    assert errors and "bogus" in errors[0] and rf.last_error


def test_a_non_number_in_guards_is_one_line_and_a_running_agent_keeps_its_rules(
    rules_path: Path,
) -> None:
    """Found by hand: ``guards: {drift_limit_s: abc}`` was a traceback in ``rules check`` and a
    failing round in a running agent (whose status showed no rules error)."""
    rf = RulesFile(rules_path)
    good = rf.current
    doc = yaml.safe_load(rules_path.read_text())
    doc["guards"] = {"drift_limit_s": "abc"}
    rules_path.write_text(yaml.safe_dump(doc))
    os.utime(rules_path, ns=(3, 3))
    with pytest.raises(RuleError, match=r"guards\.drift_limit_s: expected float, got 'abc'"):
        load_rules(rules_path)
    assert rf.poll() is False and rf.current is good
    assert rf.last_error is not None and "guards.drift_limit_s" in rf.last_error
    assert "\n" not in rf.last_error


class _AlwaysNothing:
    name = "noop"

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str) -> _AlwaysNothing:
        return cls()

    def evaluate(self, snapshot: Snapshot) -> list[Advice]:
        return []


def test_plugin_rule_types_plug_in() -> None:
    types = {**available_rule_types(), "noop": _AlwaysNothing}
    rs = parse_rules({"rules": [{"type": "noop"}]}, "r", types)
    assert isinstance(rs.rules[0], _AlwaysNothing)


def test_signals_validated() -> None:
    with pytest.raises(RuleError, match=r"signals\[0\]: missing \['metric'\]"):
        parse_rules({"signals": [{"app": "w", "prometheus_url": "http://x"}]}, "r")
    with pytest.raises(RuleError, match="not http"):
        parse_rules({"signals": [{"app": "w", "prometheus_url": "file:///x", "metric": "m"}]}, "r")
    rs = parse_rules(
        {
            "signals": [
                {"app": "w", "prometheus_url": "http://x", "metric": "m", "scale_to_ms": 1000}
            ]
        },
        "r",
    )
    assert rs.signals[0].scale_to_ms == 1000.0


def test_parse_metric_picks_labels() -> None:
    from tidal.qos.scrape import parse_metric

    text = 'lat{route="/a"} 1.5\nlat{route="/b"} 2.5\n'
    assert parse_metric(text, "lat", {"route": "/b"}) == 2.5
    assert parse_metric(text, "lat", {}) == 1.5
    assert parse_metric(text, "other", {}) is None


def test_engine_entries_select_by_label() -> None:
    rs = parse_rules(
        {
            "containers": [
                {"engine": {"priority": "offline"}, "spec": {"cpus": 2}},
                {"engine": None, "labels": {"team": "x"}},
                {"cgroup": "shop/web"},
            ],
            "engine": {"socket": "/run/tidal/engine.sock"},
        },
        "rules.yaml",
    )
    assert rs.uses_engine and rs.engine_socket == Path("/run/tidal/engine.sock")
    first, everything, plain = rs.containers
    assert (first.cgroup, first.engine_selector, first.spec_cpus) == (
        "",
        {"priority": "offline"},
        2,
    )
    assert everything.engine_selector == {} and everything.labels == {"team": "x"}
    assert plain.engine_selector is None and not parse_rules({}, "r").uses_engine


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"guards": {"drift_limit_s": -1}},
            "rules.yaml: guards.drift_limit_s must not be negative",
        ),
        (
            {
                "signals": [
                    {"app": "w", "prometheus_url": "http://x", "metric": "m", "scale_to_ms": 0}
                ]
            },
            r"rules.yaml: signals\[0\].scale_to_ms must be positive",
        ),
        (
            {"slo": {"cpu_usage_ceiling": 2}},
            "rules.yaml: slo.cpu_usage_ceiling 2.0 must be a fraction",
        ),
        (
            {"containers": [{"cgroup": "a", "spec": {"cpu": 1}}]},
            r"containers\[0\].spec: unknown key",
        ),
        ({"containers": "a"}, "rules.yaml: containers: expected a list, got 'a'"),
    ],
)
def test_nested_values_fail_with_their_key_path(doc: Any, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_rules(doc, "rules.yaml")
