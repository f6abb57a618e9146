"""The no-GPU compose variant's model service, run as a process with the command its container runs.

No container engine here: the ``local`` image's ENTRYPOINT plus the compose ``command`` are started with
this machine's llama.cpp server and the same PyPI-shipped model, and must serve the advertised model id
and pass the compose healthcheck.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from proxy.local_model.model import CHAT_TEMPLATE, XLLAMACPP, bundled_model_path
from tests.llama import unavailable_reason
from tests.ops_artifacts import DOCKER, compose_config
from tests.servers import free_port, stop_process, wait_for_port

pytestmark = [pytest.mark.ops, pytest.mark.llama]

IMAGE_MODEL_PATH = "/opt/models/smollm2.gguf"


def _local_entrypoint() -> list[str]:
    parser = DockerfileParser(path=str(DOCKER / "Dockerfile"), cache_content=True)
    stage = ""
    entrypoint: list[str] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stage = instruction["value"].split()[-1]
        elif instruction["instruction"] == "ENTRYPOINT" and stage == "local":
            entrypoint = json.loads(instruction["value"])
    assert entrypoint, "the local stage has no exec-form ENTRYPOINT"
    return entrypoint


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def wait_until_models_answer(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:  # HTTPError (503 while loading) included
            if time.monotonic() > deadline:
                raise TimeoutError(f"/v1/models did not answer 200 within {timeout:.0f}s") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def llama_service() -> Iterator[tuple[dict[str, Any], int]]:
    reason = unavailable_reason(XLLAMACPP)
    if reason is not None:
        pytest.skip(reason)
    service = compose_config("cpu")["services"]["llama"]
    command: list[str] = service["command"]
    assert IMAGE_MODEL_PATH in command
    port = free_port()
    # Same entrypoint and arguments; only the model's place on disk and the listen address differ.
    args = _with_option(command, "--model", str(bundled_model_path()))
    args = _with_option(args, "--chat-template-file", str(CHAT_TEMPLATE))
    args = _with_option(_with_option(args, "--host", "127.0.0.1"), "--port", str(port))
    entrypoint = _local_entrypoint()
    assert entrypoint[0] == "python"
    with tempfile.TemporaryFile() as log:
        # A clean environment, as in the image (PYTHONPATH only to find this checkout's code).
        env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
        proc = subprocess.Popen([sys.executable, *entrypoint[1:], *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            try:
                wait_for_port(port, timeout=60)
                wait_until_models_answer(port, timeout=120)  # it listens (answering 503) while the model loads
            except TimeoutError:
                log.seek(0)
                raise AssertionError(log.read().decode(errors="replace")[-3000:]) from None
            yield service, port
        finally:
            stop_process(proc, timeout=10)


def test_serves_the_model_alias_clients_use(llama_service: tuple[dict[str, Any], int]) -> None:
    service, port = llama_service
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        models = json.loads(response.read())
    alias = service["command"][service["command"].index("--alias") + 1]
    assert [m["id"] for m in models["data"]] == [alias]


def test_compose_healthcheck_passes_against_it(llama_service: tuple[dict[str, Any], int]) -> None:
    service, port = llama_service
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    probe = [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in test[2:])]
    assert probe != [sys.executable, *test[2:]], "the healthcheck does not probe port 8000"
    assert subprocess.run(probe, timeout=30, check=False).returncode == 0


def test_model_path_matches_the_image_layout() -> None:
    # The Dockerfile links the package's GGUF to IMAGE_MODEL_PATH; the service must use that path.
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"/opt/models/{Path(IMAGE_MODEL_PATH).name}" in dockerfile
    assert "COPY --from=builder-local /opt/models /opt/models" in dockerfile
