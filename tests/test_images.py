"""The images, built and run as the no-GPU compose file defines the services, without a Docker engine.

``podman build --isolation chroot`` builds docker/Dockerfile's ``runtime`` and ``local`` targets; each service
then runs from its image with ``buildah run --isolation chroot`` on the host network: the image's entrypoint,
user and environment, overlaid with the service's command and environment as ``docker compose config``
renders them. Only addresses differ (no compose network here: service names become loopback ports). Redis is
this machine's redis-server. A chat turn in enforce mode goes through the proxy to the local model and is
evaluated by the detector.

Slow (minutes: image builds), so opt-in: ``FAMA_IMAGE_TESTS=1``, which .ci/run sets after building the
``python:3.11-slim`` stand-in the Dockerfile starts from (Debian bookworm made with mmdebstrap).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from tests.ops_artifacts import COMPOSE_TEST_ENV, ROOT, compose_config
from tests.servers import RedisServer, free_port, stop_process

pytestmark = [
    pytest.mark.images,
    pytest.mark.redis,
    pytest.mark.skipif(
        os.environ.get("FAMA_IMAGE_TESTS") != "1", reason="builds container images (minutes): FAMA_IMAGE_TESTS=1"
    ),
    pytest.mark.skipif(
        shutil.which("podman") is None or shutil.which("buildah") is None,
        reason="podman and buildah are not installed (apt-get install -y podman buildah)",
    ),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

BASE_IMAGE = "docker.io/library/python:3.11-slim"
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TARGETS = ("runtime", "local")


def _run(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr}"
    return proc.stdout


def _image_config(image: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(_run(["podman", "image", "inspect", image], timeout=60))[0]["Config"]
    return config


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    """Both targets, built from this checkout; removed afterwards (their layers stay cached)."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode != 0:
        pytest.skip(f"no local {BASE_IMAGE} (the registry is not reachable here; .ci/run builds a stand-in)")
    run_id = uuid.uuid4().hex[:8]
    tags = {target: f"localhost/fama-test-{target}:{run_id}" for target in TARGETS}
    try:
        for target, tag in tags.items():
            build = ["podman", "build", "--isolation", "chroot", "--format", "docker", "--pull=never"]
            _run([*build, "-f", str(ROOT / "docker" / "Dockerfile"), "--target", target, "-t", tag, str(ROOT)], 1800)
        yield tags
    finally:
        for tag in tags.values():
            subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)


class Service:
    """One compose service run from its image: entrypoint + the service's command, as the image's user (or the
    service's), with the image's environment plus the service's."""

    def __init__(self, name: str, image: str, service: dict[str, Any], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        config = _image_config(image)
        self.argv = [*(config.get("Entrypoint") or []), *(service.get("command") or config.get("Cmd") or [])]
        self.user = service.get("user") or config.get("User") or "0"
        self.env = {**service.get("environment", {}), **env}
        self.container = _run(
            ["buildah", "from", "--pull-never", "--name", f"fama-test-{name}-{uuid.uuid4().hex[:8]}", image],
            timeout=120,
        ).strip()
        self.log = workdir / f"{name}.log"
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", self.user]
        cmd += [arg for k, v in self.env.items() for arg in ("--env", f"{k}={v}")]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*cmd, self.container, "--", *self.argv], stdout=out, stderr=subprocess.STDOUT)

    def exec(self, argv: list[str]) -> int:
        """Run another command in the same container (a healthcheck), as the service's user."""
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", self.user, self.container]
        return subprocess.run([*cmd, "--", *argv], capture_output=True, timeout=60, check=False).returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        subprocess.run(["buildah", "rm", self.container], capture_output=True, check=False)


def _wait_ok(url: str, services: list[Service], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            pass
        for s in services:
            if s.proc.poll() is not None:
                raise AssertionError(f"{s.name} exited with {s.proc.returncode}:\n{s.output()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name}\n{s.output()}" for s in services)
            raise AssertionError(f"{url} did not answer within {timeout:.0f}s\n{logs}")
        time.sleep(0.5)


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def _readiness_url(service: dict[str, Any], port: int) -> str:
    """The URL the service's compose healthcheck probes, on the port this run gave it."""
    probe = " ".join(service["healthcheck"]["test"])
    start = probe.index("http://")
    return (
        probe[start : probe.index("'", start)]
        .replace(":8000/", f":{port}/")
        .replace(":8080/", f":{port}/")
        .replace(":9100/", f":{port}/")
    )


@pytest.fixture(scope="module")
def stack(images: dict[str, str]) -> Iterator[dict[str, Any]]:
    compose = compose_config("cpu", env={**COMPOSE_TEST_ENV, "FAMA_MODE": "enforce"})["services"]
    workdir = Path(tempfile.mkdtemp(prefix="fama-images-"))
    redis_server = RedisServer()
    ports = {"llama": free_port(), "proxy": free_port(), "detector": free_port()}
    redis_url = compose["proxy"]["environment"]["FAMA_REDIS_URL"].replace(
        "redis:6379", f"127.0.0.1:{redis_server.port}"
    )
    services: list[Service] = []
    try:
        llama = dict(compose["llama"])
        llama["command"] = _with_option(
            _with_option(llama["command"], "--host", "127.0.0.1"), "--port", str(ports["llama"])
        )
        services.append(Service("llama", images["local"], llama, {}, workdir))
        _wait_ok(f"http://127.0.0.1:{ports['llama']}/v1/models", services, timeout=300)
        upstream = compose["proxy"]["environment"]["FAMA_UPSTREAM_URL"].replace(
            "llama:8000", f"127.0.0.1:{ports['llama']}"
        )
        services.append(
            Service(
                "proxy",
                images["runtime"],
                compose["proxy"],
                {"FAMA_REDIS_URL": redis_url, "FAMA_UPSTREAM_URL": upstream, "FAMA_PORT": str(ports["proxy"])},
                workdir,
            )
        )
        services.append(
            Service(
                "detector",
                images["runtime"],
                compose["detector"],
                {"FAMA_REDIS_URL": redis_url, "FAMA_METRICS_PORT": str(ports["detector"])},
                workdir,
            )
        )
        for name in ("proxy", "detector"):
            _wait_ok(_readiness_url(compose[name], ports[name]).replace("/healthz", "/readyz"), services, timeout=180)
        yield {"compose": compose, "ports": ports, "services": {s.name: s for s in services}}
    finally:
        for s in reversed(services):
            s.stop()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_services_run_as_compose_defines_them(stack: dict[str, Any]) -> None:
    compose, services = stack["compose"], stack["services"]
    assert services["proxy"].argv[-len(compose["proxy"]["command"]) :] == compose["proxy"]["command"]
    assert services["detector"].argv[-1:] == ["detector"]
    assert services["proxy"].env["FAMA_MODE"] == "enforce"
    for name in ("proxy", "detector", "llama"):
        assert services[name].user not in ("", "0", "root"), name  # the image's non-root user


def test_local_model_answers_with_the_alias_and_passes_its_healthcheck(stack: dict[str, Any]) -> None:
    compose, port = stack["compose"]["llama"], stack["ports"]["llama"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        models = json.loads(response.read())
    alias = compose["command"][compose["command"].index("--alias") + 1]
    assert [m["id"] for m in models["data"]] == [alias]
    test = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in compose["healthcheck"]["test"][1:]]
    assert stack["services"]["llama"].exec(test) == 0


def _turns_evaluated(detector_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{detector_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    found = re.search(r'^fama_detector_turns_total\{outcome="ok"\} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_tool_turn_through_the_proxy_is_answered_and_evaluated_by_the_detector(stack: dict[str, Any]) -> None:
    ports, compose = stack["ports"], stack["compose"]
    alias = compose["llama"]["command"][compose["llama"]["command"].index("--alias") + 1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['proxy']}/v1", api_key="unused", max_retries=0)
    # Declared tools make the turn a supervised one: the proxy publishes it to Redis for the detector.
    raw = client.chat.completions.with_raw_response.create(
        model=alias,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        max_tokens=24,
        temperature=0,
        extra_headers={"x-fama-session": "images"},
        timeout=180,
    )
    message = raw.parse().choices[0].message
    assert message.content or message.tool_calls
    assert raw.headers["x-fama-session"] == "images"
    deadline = time.monotonic() + 60
    while _turns_evaluated(ports["detector"]) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _turns_evaluated(ports["detector"]) >= 1, stack["services"]["detector"].output()
