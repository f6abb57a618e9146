"""Prometheus config, alert rules and their unit tests, checked with the real promtool."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops_artifacts import ALERTS, DOCKER, catalog_metric_names, run
from tests.promql import metric_names

pytestmark = [
    pytest.mark.ops,
    pytest.mark.skipif(
        shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)"
    ),
]

PROMETHEUS_DIR = DOCKER / "prometheus"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
# Series Prometheus itself adds to every scrape job.
SCRAPE_SERIES = {"up"}
REQUIRED_ALERTS = {
    "FamaDetectorLagHigh",
    "FamaVerdictDeadlineMisses",
    "FamaDegradedRateHigh",
    "FamaUpstreamErrors",
    "FamaDeadLetters",
}


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = run([promtool, *args], cwd=cwd)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_prometheus_config_is_valid() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert "1 rule files found" in out


def test_alert_rules_are_valid() -> None:
    out = _promtool("check", "rules", "alerts.yml")
    assert f"{len(_alerts())} rules found" in out


def test_alert_unit_tests_pass() -> None:
    out = _promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    # The unit tests above only mean something if a wrong expectation fails.
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tests["tests"] = tests["tests"][:1]
    tests["tests"][0]["alert_rule_test"][-1]["exp_alerts"][0]["exp_labels"]["severity"] = "page"
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert proc.returncode != 0


def test_required_alerts_exist_and_each_has_firing_and_quiet_tests() -> None:
    names = {rule["alert"] for rule in _alerts()}
    assert names >= REQUIRED_ALERTS
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == names, f"alerts without a firing test: {names - firing}"
    assert quiet >= names - {"FamaDetectorDown"}, f"alerts without a quiet test: {names - quiet}"


def test_alerts_reference_only_catalog_metrics() -> None:
    known = catalog_metric_names() | SCRAPE_SERIES
    for rule in _alerts():
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']} uses unknown metrics {used - known}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= rule["annotations"].keys()


def test_scrape_jobs_match_the_alert_job_labels() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"fama-proxy", "fama-detector"} <= jobs
    for rule in _alerts():
        for job in ("fama-proxy", "fama-detector"):
            if f'job="{job}"' in rule["expr"]:
                assert job in jobs
