"""observability/: the Prometheus rules pass promtool; the dashboard asks only for metrics catalog exports."""

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"
RULES = OBS / "alerts.yaml"
RULE_TESTS = OBS / "alerts.test.yaml"
DASHBOARD = OBS / "dashboard.json"

# Every metric family catalog's /metrics serves: the contract's own metrics ...
CONTRACT_METRICS = {
    "catalog_cache_requests_total": "counter",
    "catalog_cache_circuit_open": "gauge",
    "catalog_auth_failures_total": "counter",
    "catalog_api_keys_loaded": "gauge",
    "catalog_db_queries_total": "counter",
    "catalog_rate_limited_total": "counter",
}
# ... plus prometheus-flask-exporter's (default prefix "flask", group_by="url_rule") and the version info.
EXPORTER_METRICS = {
    "flask_http_request_duration_seconds": "histogram",
    "flask_http_request_total": "counter",
    "flask_http_request_exceptions_total": "counter",
    "flask_exporter_info": "gauge",
    "catalog_app_info": "gauge",
}
EXPORTED_FAMILIES = {**CONTRACT_METRICS, **EXPORTER_METRICS}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus itself adds to every target (the rules may use them, the dashboard does not).
SCRAPE_SERIES = {"up"}
# The labels each family carries (besides job/instance added by the scrape). Note: the exporter puts
# `url_rule` on the duration histogram only; `flask_http_request_total` has method and status.
LABELS = {
    "flask_http_request_total": {"method", "status"},
    "flask_http_request_duration_seconds": {"method", "status", "url_rule"},
    "catalog_cache_requests_total": {"result"},
    "catalog_auth_failures_total": {"reason"},
    "catalog_db_queries_total": {"operation"},
    "catalog_rate_limited_total": {"client"},
    "catalog_app_info": {"version", "commit"},
}

PROMQL_FUNCTIONS_AND_KEYWORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
DURATION = re.compile(r"\[[^\]]*\]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
MATCHERS = re.compile(r"\{[^{}]*\}")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
GRAFANA_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and Grafana vars removed)."""
    text = GRAFANA_VAR.sub("5m", expr)
    text = STRING.sub('""', text)
    text = MATCHERS.sub("", text)
    text = GROUPING.sub(" ", text)
    text = DURATION.sub("", text)
    names = set()
    for match in IDENT.finditer(text):
        name = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if name.lower() in PROMQL_FUNCTIONS_AND_KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name) or name[0].isdigit():
            continue
        before = text[: match.start()]
        if re.search(r"\d\.?$", before) or re.search(r"\d[eE][+-]?$", before):  # 1e3, 0.5
            continue
        names.add(name)
    return names


def family(name: str) -> str:
    """Map a series name back to its family: histogram `_bucket/_sum/_count` to the histogram's name."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and EXPORTED_FAMILIES.get(base) == "histogram":
            return base
    return name


def dashboard_queries(node: Any) -> list[str]:
    """Every PromQL query in a dashboard: panel targets (`expr`) and templating variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


def label_values_metric(query: str) -> str:
    """`label_values(metric{...}, label)` -> the PromQL selector inside it (Grafana's variable query)."""
    inner = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]+\s*\)\s*", query, re.S)
    return inner.group(1) if inner else query


def load_rules() -> dict[str, Any]:
    data = yaml.safe_load(RULES.read_text())
    assert isinstance(data, dict)
    return data


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


# --- the metric-name extractor itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (job) (rate(flask_http_request_total{status=~"5.."}[5m]))', {"flask_http_request_total"}),
        (
            'histogram_quantile(0.99, sum by (url_rule, le) (rate(x_bucket{job=~"$job"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        ("a / on (job) group_left (version) b > 1e3 and c offset 5m", {"a", "b", "c"}),
        ("job:catalog_http_error_ratio:rate5m > 0.05", {"job:catalog_http_error_ratio:rate5m"}),
        ('absent(up{job=~".*catalog.*"})', {"up"}),
    ],
)
def test_metric_name_extraction(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


# --- rules --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.slow
def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=OBS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


REQUIRED_ALERTS = {
    "CatalogHighErrorRatio": {"flask_http_request_total"},
    "CatalogHighLatencyP99": {"flask_http_request_duration_seconds_bucket"},
    "CatalogRedisCircuitOpen": {"catalog_cache_circuit_open"},
    "CatalogAuthFailureBurst": {"catalog_auth_failures_total"},
    "CatalogNoApiKeysLoaded": {"catalog_api_keys_loaded"},
    "CatalogTargetDown": {"up"},
}


def expanded_metrics(expr: str, recorded: dict[str, str]) -> set[str]:
    """Metric names an expression depends on, following recording rules to the raw series."""
    names: set[str] = set()
    for name in metric_names(expr):
        names |= expanded_metrics(recorded[name], recorded) if name in recorded else {name}
    return names


def test_every_alert_is_complete_and_uses_exported_metrics() -> None:
    rules = all_rules()
    recorded = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(REQUIRED_ALERTS) <= set(alerts)
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name} has no for:"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), f"{name} lacks the {annotation} annotation"
        assert "observability/README.md#" + name.lower() in rule["annotations"]["runbook"]
        used = expanded_metrics(rule["expr"], recorded)
        assert used >= REQUIRED_ALERTS.get(name, set()), (name, used)
        for metric in used:
            assert family(metric) in EXPORTED_FAMILIES or metric in SCRAPE_SERIES, (name, metric)
    for record, expr in recorded.items():
        for metric in expanded_metrics(expr, recorded):
            assert family(metric) in EXPORTED_FAMILIES, (record, metric)


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in all_rules() if "alert" in rule}
    assert alerts <= firing, alerts - firing
    assert alerts <= quiet, alerts - quiet


def test_alert_selectors_use_one_job_matcher() -> None:
    """Every raw selector names the same job matcher, so changing it is one documented sed."""
    for rule in all_rules():
        for selector in re.findall(r"([a-z_]+)\{([^}]*)\}", rule["expr"]):
            assert 'job=~".*catalog.*"' in selector[1], (rule.get("alert") or rule.get("record"), selector)


# --- dashboard ----------------------------------------------------------------------------------------


def test_dashboard_queries_only_name_exported_metrics(dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    used: set[str] = set()
    for query in queries:
        names = metric_names(label_values_metric(query))
        assert names, f"no metric in {query!r}"
        for name in names:
            assert family(name) in EXPORTED_FAMILIES, f"{name} (in {query!r}) is not exported by catalog"
        used |= names
    # ... and it shows everything the issue asks for.
    wanted = {
        "flask_http_request_total",
        "flask_http_request_duration_seconds_bucket",
        "catalog_cache_requests_total",
        "catalog_cache_circuit_open",
        "catalog_auth_failures_total",
        "catalog_api_keys_loaded",
        "catalog_rate_limited_total",
        "catalog_db_queries_total",
    }
    assert wanted <= used, wanted - used


def test_dashboard_grouping_labels_exist(dashboard: dict[str, Any]) -> None:
    """`by (...)` in a query groups by labels the selected metric carries (or job/instance)."""
    for query in dashboard_queries(dashboard):
        names = metric_names(label_values_metric(query))
        available = {"job", "instance"}
        for name in names:
            available |= LABELS.get(family(name), set())
            if name.endswith("_bucket"):
                available.add("le")
        for group in re.findall(r"\bby\s*\(([^)]*)\)", query):
            for label in (part.strip() for part in group.split(",")):
                assert label in available, f"{query!r} groups by {label}, which {names} does not carry"


def test_dashboard_latency_per_route(dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(q.startswith(f"histogram_quantile({quantile}, sum by (url_rule, le)") for q in queries), (
            quantile
        )


def test_dashboard_uses_templated_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    def datasources(node: Any) -> list[Any]:
        found: list[Any] = []
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource" and isinstance(value, dict) and value.get("type") != "grafana":
                    found.append(value)
                else:
                    found.extend(datasources(value))
        elif isinstance(node, list):
            for item in node:
                found.extend(datasources(item))
        return found

    refs = datasources(dashboard["panels"]) + datasources(dashboard["templating"])
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": "${datasource}"}, ref
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"]
    assert dashboard["title"]


@pytest.mark.slow
def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables replaced by sample values)."""
    promtool = require_tool("promtool")
    rules = []
    for index, query in enumerate(dashboard_queries(dashboard)):
        expr = label_values_metric(query)
        expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
        expr = GRAFANA_VAR.sub("x", expr)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_exported_set_matches_the_service_source() -> None:
    """The constant above is what src/catalog defines: every catalog_* metric, no more, no less."""
    defined = set()
    for path in (ROOT / "src" / "catalog").rglob("*.py"):
        defined |= set(
            re.findall(
                r"""(?:Counter|Gauge|Histogram|Summary)\(\s*["'](catalog_[a-z_]+)["']""", path.read_text()
            )
        )
    expected = {name for name in EXPORTED_FAMILIES if name.startswith("catalog_")}
    assert defined == expected
