"""The Grafana dashboard, Prometheus config and docs/metrics.md agree with the metric catalogue."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from streams.core import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "messenger-streams.json"
DOCS = ROOT / "docs" / "metrics.md"

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names (inside `{}` / `by ()`), strings, durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables outside ranges
    text = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", "", text)  # numbers: 0.99, 1e-9
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash["panels"])
    return exprs


def test_parser_finds_names_and_a_typo_fails() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(messenger_processing_latency_seconds_bucket'
            '{stage=~"$stage"}[$__rate_interval]))) / clamp_min(sum(rate(messenger_raw_bodies_total[5m])), 1e-9)')
    assert metric_names(expr) == {"messenger_processing_latency_seconds_bucket", "messenger_raw_bodies_total"}
    assert metric_names('sum(rate(messenger_dead_leters_total[5m]))') - metrics.exported_names() == {
        "messenger_dead_leters_total"
    }


def test_every_dashboard_expr_uses_catalogue_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    exported = metrics.exported_names()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} uses metrics not in streams.metrics: {sorted(unknown)}"
        used |= names
    # the panels the issue asks for are there
    for needed in ("messenger_csat_answers_total", "messenger_csat_aggregate_answers", "messenger_csat_percent",
                   "messenger_csat_response_rate", "messenger_console_events_total", "messenger_events_in_total",
                   "messenger_dead_letters_total", "messenger_processing_latency_seconds_bucket",
                   # the contact-center figures of PLAN §G (issue 16)
                   "messenger_first_response_seconds_bucket", "messenger_queue_wait_seconds_bucket",
                   "messenger_handle_seconds_bucket", "messenger_conversations_abandoned_total",
                   "messenger_page_messages_total", "messenger_agent_messages_total"):
        assert needed in used


def test_template_variable_query_uses_catalogue_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert m and m.group(1) in metrics.exported_names()


def test_dashboard_datasource_is_provisioned() -> None:
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    datasources = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    assert uids == {"prometheus"}
    assert "uid: prometheus" in datasources and "type: prometheus" in datasources
    provider = (ROOT / "deploy/grafana/provisioning/dashboards/messenger-streams.yaml").read_text()
    assert "type: file" in provider and "path: " in provider
    prom = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    assert "metrics_path: /metrics" in prom and ":6066" in prom


@pytest.mark.parametrize("metric", metrics.CATALOGUE, ids=lambda m: m.describe()[0].name)
def test_every_catalogue_metric_is_documented(metric: Any) -> None:
    fam = metric.describe()[0]
    wire = fam.name + "_total" if fam.type == "counter" else fam.name
    docs = DOCS.read_text()
    row = next((line for line in docs.splitlines() if line.startswith(f"| `{wire}` |")), None)
    assert row is not None, f"{wire} is missing from docs/metrics.md"
    assert f"| {fam.type} |" in row
    for label in metric._labelnames:
        assert f"`{label}`" in row, f"label {label} of {wire} is not documented"
