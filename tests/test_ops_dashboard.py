"""The Grafana dashboard and its provisioning: datasource uid, panels, and every PromQL query."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.ops_artifacts import (
    DATASOURCE_UID,
    DOCKER,
    catalog_metric_names,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    run,
)
from tests.promql import metric_names

pytestmark = pytest.mark.ops

PROVISIONING = DOCKER / "grafana" / "provisioning"
# What the dashboard must show (issue: interventions, top flagged tools, overhead and TTFT, detector lag and
# throughput, degraded/timeouts, upstream errors, outcomes with vs without interventions).
REQUIRED_PANELS = {
    "Interventions by category and action": {"fama_interventions_total"},
    "Top flagged tools": {"fama_findings_total"},
    "Proxy overhead (request time minus upstream time)": {"fama_proxy_overhead_seconds_bucket"},
    "Time to first token": {"fama_time_to_first_token_seconds_bucket"},
    "Detector lag and pending entries": {"fama_detector_stream_lag", "fama_detector_pending_entries"},
    "Detector throughput": {"fama_detector_turns_total"},
    "Degraded responses and deadline misses": {"fama_degraded_responses_total", "fama_verdict_deadline_misses_total"},
    "Upstream errors by kind": {"fama_upstream_errors_total"},
    "Session success rate with vs without interventions": {"fama_session_outcomes_total"},
    "Would have acted, by outcome": {"fama_shadow_outcomes_total"},
    "Profile in force (processes per hash and version)": {"fama_profile_info"},
}


def test_dashboard_loads_with_a_stable_uid() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "fama-overview"
    assert dashboard["title"]
    panels = list(dashboard_panels(dashboard))
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert len(panels) >= len(REQUIRED_PANELS)


def test_every_panel_and_target_uses_the_fixed_datasource() -> None:
    for panel in dashboard_panels(load_dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_provisioned_datasource_has_the_fixed_uid() -> None:
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service name


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "fama.yml").read_text())["providers"]
    assert provider["type"] == "file"
    # docker-compose.yml mounts docker/grafana/dashboards here.
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DOCKER.parent / "docker-compose.yml").read_text())
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose["services"]["grafana"]["volumes"]


def test_required_panels_query_the_right_metrics() -> None:
    by_title: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        by_title.setdefault(title, set()).update(metric_names(expr))
    for title, metrics in REQUIRED_PANELS.items():
        assert title in by_title, f"missing panel {title!r}"
        assert metrics <= by_title[title], f"{title}: queries {by_title[title]}"


def test_a_profile_switch_is_marked_on_every_panel() -> None:
    # A pushed profile (POST /admin/profile) changes fama_profile_info's labels; an annotation marks the moment.
    (switch,) = [a for a in load_dashboard()["annotations"]["list"] if a["name"] == "Profile switch"]
    assert switch["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
    assert metric_names(switch["expr"]) == {"fama_profile_info"} <= catalog_metric_names()
    assert switch["expr"] in {expr for _, expr in dashboard_queries()}  # so promtool parses it too (below)


def test_every_query_references_only_catalog_metrics() -> None:
    known = catalog_metric_names()
    for title, expr in dashboard_queries():
        used = metric_names(expr)
        assert used, f"{title}: {expr} selects no metric"
        assert used <= known, f"{title}: unknown metrics {used - known}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_every_query_parses_in_prometheus(tmp_path: Path) -> None:
    # promtool parses each expression with Prometheus' own parser when they are recording rules.
    queries = dashboard_queries()
    rules = [{"record": f"fama:dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = run([promtool, "check", "rules", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(queries)} rules found" in proc.stdout


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
