"""deploy/: the Grafana dashboard and the Prometheus alert rules.

promtool checks the rules and runs their unit tests (each alert fires where
it should and stays quiet where it should not); every metric any PromQL
expression of the dashboard or the rules selects, and every label it
matches on, is one torpord exports (METRICS, issue 15's plan).
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promtool import REQUIRED, promtool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "torpor.json"
RULES = ROOT / "deploy" / "prometheus" / "torpor-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "torpor-alerts.test.yml"

# torpord's /metrics: name -> (type, labels). The contract between the
# metrics, the dashboard and the rules; compare it with a real scrape when
# either changes.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels.split()))
    for name, kind, labels in (
        ("torpor_load_duration_seconds", "histogram", "model"),
        ("torpor_wake_duration_seconds", "histogram", "model level source"),
        ("torpor_wake_first_layer_seconds", "histogram", "model level source"),
        ("torpor_sleep_duration_seconds", "histogram", "model level"),
        ("torpor_offload_duration_seconds", "histogram", "model tier"),
        ("torpor_acquire_ready_seconds", "histogram", "model hit"),
        ("torpor_transitions_total", "counter", "model kind outcome cause"),
        ("torpor_acquires_total", "counter", "model result"),
        ("torpor_node_load_duration_seconds", "histogram", ""),
        ("torpor_node_wake_duration_seconds", "histogram", "level source"),
        ("torpor_node_wake_first_layer_seconds", "histogram", "level source"),
        ("torpor_node_sleep_duration_seconds", "histogram", "level"),
        ("torpor_node_offload_duration_seconds", "histogram", "tier"),
        ("torpor_node_acquire_ready_seconds", "histogram", "hit"),
        ("torpor_node_transitions_total", "counter", "kind outcome cause"),
        ("torpor_node_acquires_total", "counter", "result"),
        ("torpor_moved_bytes_total", "counter", "path"),
        ("torpor_checksum_failures_total", "counter", "tier"),
        ("torpor_scrub_bytes_total", "counter", "tier"),
        ("torpor_scrub_corrupt_total", "counter", "tier"),
        ("torpor_quiesce_timeouts_total", "counter", "model"),
        ("torpor_engines_revoked_total", "counter", "model"),
        ("torpor_engine_attaches_total", "counter", "model"),
        ("torpor_engine_detaches_total", "counter", "model"),
        ("torpor_memory_capacity_bytes", "gauge", "tier device"),
        ("torpor_memory_used_bytes", "gauge", "tier device"),
        ("torpor_memory_held_bytes", "gauge", "tier device"),
        ("torpor_models", "gauge", "state"),
        ("torpor_model_resident_bytes", "gauge", "model tier"),
        ("torpor_engines_attached", "gauge", "model"),
        ("torpor_build_info", "gauge", "version backend"),
    )
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may select, with its labels (a histogram's
    _bucket, _count and _sum; Prometheus' own `up`)."""
    found = {"up": frozenset()}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            found |= {name + "_bucket": labels | {"le"}, name + "_count": labels}
            found[name + "_sum"] = labels
        else:
            found[name] = labels
    return {name: labels | TARGET_LABELS for name, labels in found.items()}


# PromQL words that are not metric names where they stand without a call.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each metric `expr` selects, with the label names its matchers use."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # (strings: label values, Grafana variables)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(GROUPING, " ", text)
    found = []
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = match.groups()
        if (call and not matchers) or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        found.append((name, set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels of `expr`'s by/without/on/ignoring/group_* clauses."""
    return {
        label.strip()
        for clause in re.findall(GROUPING, expr)
        for label in clause.split(",")
        if label.strip()
    }


def check_expr(expr: str, where: str) -> list[str]:
    """What in `expr` torpord's metrics don't have."""
    known = series_labels()
    problems = []
    selected = selectors(expr)
    if not selected:
        problems.append(f"{where}: selects no metric: {expr}")
    for name, labels in selected:
        if name not in known:
            problems.append(f"{where}: {name!r} is not a metric torpord exports")
        elif labels - known[name]:
            problems.append(f"{where}: {name} has no label {sorted(labels - known[name])}")
    have = set().union(*(known.get(name, set()) for name, _ in selected))
    if grouping_labels(expr) - have:
        problems.append(f"{where}: groups by {sorted(grouping_labels(expr) - have)}, not labels")
    return problems


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out += [panel, *panel.get("panels", [])]
    return out


def graphs() -> list[dict[str, Any]]:
    return [p for p in all_panels() if p["type"] != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(f"panel {p['title']!r}", t["expr"]) for p in graphs() for t in p["targets"]]


@cache
def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


# --- the checker itself -------------------------------------------------------


def test_the_checker_reads_promql_as_meant() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, level) ("
        'rate(torpor_wake_duration_seconds_bucket{job=~"$job", model=~"a|b"}[$__rate_interval])'
        ")) / on (instance) group_left ()"
        " (x_total unless x_total offset 10m) or vector(0)"
    )
    assert selectors(expr) == [
        ("torpor_wake_duration_seconds_bucket", {"job", "model"}),
        ("x_total", set()),
        ("x_total", set()),
    ]
    assert grouping_labels(expr) == {"le", "level", "instance"}
    assert check_expr(expr, "here") == [
        "here: 'x_total' is not a metric torpord exports",
        "here: 'x_total' is not a metric torpord exports",
    ]
    assert check_expr('sum by (tier) (torpor_models{tier="host"})', "here") == [
        "here: torpor_models has no label ['tier']",
        "here: groups by ['tier'], not labels",
    ]
    assert check_expr("vector(1)", "here") == ["here: selects no metric: vector(1)"]


# --- the dashboard ------------------------------------------------------------


def test_the_dashboard_is_grafana_json_with_its_variables() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "model"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    for _, expr in [(v["name"], v["definition"]) for v in variables.values() if "definition" in v]:
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        assert inner is not None, expr
        assert check_expr(inner.group(1), "variable") == []


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    ids = [p["id"] for p in all_panels()]
    assert len(ids) == len(set(ids)), ids
    for p in all_panels():
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]


def test_every_panel_queries_prometheus_through_the_variable() -> None:
    for p in graphs():
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_the_dashboards_queries_use_only_torpords_metrics() -> None:
    problems = [msg for where, expr in dashboard_exprs() for msg in check_expr(expr, where)]
    assert problems == []


def grafana_expanded(expr: str) -> str:
    """`expr` as Grafana sends it: its interval variables a duration, the
    others (job, instance, model: matched with =~) a regex."""
    return re.sub(
        r"\$\{?(\w+)\}?",
        lambda m: "5m" if m.group(1) in ("__rate_interval", "__interval", "__range") else ".*",
        expr,
    )


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query, variables expanded, as a recording rule: promtool parses it."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_expanded(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_the_dashboard_shows_every_metric() -> None:
    shown = {name for _, expr in dashboard_exprs() for name, _ in selectors(expr)}
    bases = {re.sub(r"_(bucket|count|sum)$", "", n) for n in shown}
    assert set(METRICS) - bases == set()


def test_the_dashboard_shows_the_issues_figures() -> None:
    """Switch rate, wake and cold-start P95/P99, with ordinary PromQL over
    the node's series (a per-model series' first event is no increase)."""
    exprs = [expr for _, expr in dashboard_exprs()]
    assert any(
        "rate(torpor_node_transitions_total" in e and 'outcome="succeeded"' in e for e in exprs
    )
    for q in ("0.95", "0.99"):
        for histogram in ("wake_duration", "load_duration"):
            assert any(
                f"histogram_quantile({q}," in e and f"torpor_node_{histogram}_seconds_bucket" in e
                for e in exprs
            ), (q, histogram)


def test_panels_sum_over_models_only_with_the_nodes_series() -> None:
    """A per-model family (one with a torpor_node_* twin) is only queried
    for the models of the Model menu, model by model; sums over every model
    read the node's series (a per-model series' first event is no increase)."""
    twins = {n.replace("torpor_node_", "torpor_", 1) for n in METRICS if "_node_" in n}
    assert len(twins) == 8 and twins <= set(METRICS)
    for where, expr in dashboard_exprs():
        for name, labels in selectors(expr):
            if re.sub(r"_(bucket|count|sum)$", "", name) in twins:
                assert "model" in labels and "model" in grouping_labels(expr), (where, expr)


# --- the alert rules ----------------------------------------------------------

ALERTS = {
    "TorporDown",
    "TorporWakeFailures",
    "TorporChecksumFailures",
    "TorporDeviceMemoryNearBudget",
    "TorporHostMemoryNearBudget",
    "TorporEnginesRevoked",
    "TorporQuiesceTimeouts",
}


def test_each_alert_has_a_severity_and_says_what_happened() -> None:
    assert {r["alert"] for r in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_the_rules_use_only_torpords_metrics() -> None:
    problems = [msg for r in rules() for msg in check_expr(r["expr"], r["alert"])]
    assert problems == []


def test_the_rule_tests_fire_and_spare_each_alert() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired: set[str] = set()
    spared: set[str] = set()
    for test in tests["tests"]:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else spared).add(case["alertname"])
    assert (fired, spared) == (ALERTS, ALERTS)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=RULES.parent,
    )


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_runs_the_rule_tests() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_sees_a_broken_rule(tmp_path: Path) -> None:
    """The checks above can fail: promtool refuses a rule that doesn't parse."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("up{job=", "up{{job=", 1))
    result = subprocess.run(
        [promtool(), "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0


def test_a_missing_promtool_skips_where_allowed_and_fails_where_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # (a directory without promtool)
    monkeypatch.delenv(REQUIRED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        promtool()
    monkeypatch.setenv(REQUIRED, "1")
    with pytest.raises(pytest.fail.Exception, match=r"must run here.*not installed"):
        promtool()
