"""Prometheus config (promtool) and the Grafana provisioning: every dashboard query uses metrics the service exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from compose_yaml import ROOT, load_compose
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "convnext.json"

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min", "clamp_max",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "label_values",
    "avg_over_time", "max_over_time", "topk", "bottomk", "abs", "time", "vector", "scalar", "le", "bool",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"\1", expr)  # label_values(metric, label)
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?", "", expr)  # number literals
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return names - PROMQL_WORDS


def exported_series_names(scrape: str) -> set[str]:
    """Every sample name the scrape can carry, from each family's type (labelled families without series count too)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
                "info": ("_info",), "gauge": ("",), "unknown": ("",)}
    names = set()
    for family in text_string_to_metric_families(scrape):
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return {n for n in names if n.startswith("convnext_")}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        queries.append((f"variable ${variable['name']}", variable["definition"]))
    return queries


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `apt-get install prometheus` (make system-deps)"
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_service_on_its_port():
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "convnext")
    assert job["metrics_path"] == "/metrics"
    compose = load_compose(ROOT / "docker-compose.yml")
    assert "service:8000" in job["static_configs"][0]["targets"]
    assert "service" in compose["services"]


def test_the_metric_name_parser_sees_through_promql():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(convnext_request_duration_seconds_bucket{route=~"$route"}'
            '[$__rate_interval]))) / clamp_min(sum(convnext_queue_depth), 1e-9)')
    assert metric_names(expr) == {"convnext_request_duration_seconds_bucket", "convnext_queue_depth"}


def test_every_dashboard_query_reads_only_metrics_the_service_exports(metrics_scrape):
    exported = exported_series_names(metrics_scrape)
    assert {"convnext_requests_total", "convnext_request_duration_seconds_bucket", "convnext_batch_size_bucket",
            "convnext_queue_depth", "convnext_model_info", "convnext_rejected_total", "convnext_grpc_requests_total",
            "convnext_grpc_request_duration_seconds_bucket"} <= exported
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which /metrics does not export"


def sample_labels(scrape: str) -> dict[str, dict[str, set[str]]]:
    """Per sample name, each label's values in the scrape."""
    labels: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            for label, value in sample.labels.items():
                labels.setdefault(sample.name, {}).setdefault(label, set()).add(value)
    return labels


def test_the_scrape_holds_http_and_grpc_series_answered_and_refused(metrics_scrape):
    """So that the label checks below test the gRPC panels against labels the service really writes."""
    labels = sample_labels(metrics_scrape)
    for name in ("convnext_grpc_requests_total", "convnext_grpc_request_duration_seconds_bucket"):
        assert labels[name]["method"] == {"ModelInfer"} and labels[name]["code"] == {"OK", "NOT_FOUND"}, name
    assert {"200", "400"} <= labels["convnext_requests_total"]["status"]


def test_every_label_the_dashboard_groups_by_or_selects_on_exists_on_its_metric(metrics_scrape):
    labels = {name: set(values) for name, values in sample_labels(metrics_scrape).items()}
    for title, expr in dashboard_queries():
        grouped = {label.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in g.split(",")} - {"le"}
        matched = set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))  # selectors: {status_class="2xx"}
        available = set().union(*(labels.get(n, set()) for n in metric_names(expr)))
        assert grouped <= available, (f"panel {title!r} groups by {sorted(grouped - available)}, "
                                      "not labels of its metrics")
        assert matched <= available, (f"panel {title!r} selects on {sorted(matched - available)}, "
                                      "not labels of its metrics")


def test_every_label_value_the_dashboard_selects_exactly_is_one_the_service_writes(metrics_scrape):
    """`code="OK"`, `status_class="2xx"`: a value the service never writes (`code="Ok"`) leaves a panel empty."""
    labels = sample_labels(metrics_scrape)
    for title, expr in dashboard_queries():
        for label, value in re.findall(r'[{,]\s*(\w+)\s*=(?![~=])\s*"([^"]*)"', expr):
            written = set().union(*(labels.get(name, {}).get(label, set()) for name in metric_names(expr)))
            assert value in written, f"panel {title!r} selects {label}={value!r}; the service writes {sorted(written)}"


@pytest.mark.parametrize("needle", [
    "rate(convnext_images_total",
    "histogram_quantile(0.5, sum by (le) (rate(convnext_request_duration_seconds_bucket",
    "histogram_quantile(0.95, sum by (le) (rate(convnext_request_duration_seconds_bucket",
    "histogram_quantile(0.99, sum by (le) (rate(convnext_request_duration_seconds_bucket",
    "convnext_batch_size_bucket",
    "convnext_queue_depth",
    'convnext_requests_total{status=~"5.."}',
    "convnext_rejected_total",
    "sum by (method, code) (rate(convnext_grpc_requests_total[",
    'histogram_quantile(0.5, sum by (le, method) (rate(convnext_grpc_request_duration_seconds_bucket{code="OK"}',
    'histogram_quantile(0.95, sum by (le, method) (rate(convnext_grpc_request_duration_seconds_bucket{code="OK"}',
])
def test_dashboard_has_the_required_panel_queries(needle):
    assert any(needle in expr for _, expr in dashboard_queries()), needle


def test_grafana_datasource_and_dashboard_provider_match_the_dashboard():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "convnext.yml").read_text())
    compose = load_compose(ROOT / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
