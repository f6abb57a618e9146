"""openai-python's own generated API tests, straight against a Prism mock of OpenAI's spec and through ``fama serve``
in front of the same mock: per API, the tests that pass through the proxy are exactly those that pass straight.

Needs the ``openai`` sdist (its ``tests/api_resources``) and ``@stoplight/prism-cli``, both cached outside the repo
by ``.ci/run`` (``$FAMA_CACHE_DIR``, default ``~/.cache/fama``); skips naming what is missing otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.servers import free_port, shared_dir, stop_process, wait_for_port

pytestmark = pytest.mark.conformance

# Keep in step with .ci/run, which fetches both.
OPENAI_SDK_VERSION = "3.51.0"
PRISM_VERSION = "5.16.0"

# API -> the sdist's test modules (dotted, as junit names them) and the files to run.
GROUPS: dict[str, tuple[str, ...]] = {
    "chat completions": ("tests/api_resources/chat",),
    "completions": ("tests/api_resources/test_completions.py",),
    "embeddings": ("tests/api_resources/test_embeddings.py",),
    "models": ("tests/api_resources/test_models.py",),
    "responses": ("tests/api_resources/test_responses.py", "tests/api_resources/responses/test_input_items.py"),
}
# Responses create, retrieve, delete, cancel and input items; ``compact`` is outside what the proxy serves.
SELECTION = "not compact"


def _cache() -> Path:
    return Path(os.environ.get("FAMA_CACHE_DIR") or Path.home() / ".cache" / "fama")


def _sdist() -> Path:
    return _cache() / "sdist" / f"openai-{OPENAI_SDK_VERSION}.tar.gz"


def _prism() -> Path:
    return _cache() / f"prism-{PRISM_VERSION}" / "node_modules" / ".bin" / "prism"


@pytest.fixture(scope="module")
def sdk_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sdist = _sdist()
    if not sdist.is_file():
        pytest.skip(f"the openai {OPENAI_SDK_VERSION} sdist is not at {sdist} (.ci/run downloads it)")
    target = tmp_path_factory.mktemp("openai-sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(target, filter="data")
    return target / f"openai-{OPENAI_SDK_VERSION}"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            httpx2.get(url, timeout=2)
            return
        except httpx2.TransportError:
            time.sleep(0.2)
    pytest.fail(f"nothing answered {url} within {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def prism_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    prism = _prism()
    if not prism.is_file():
        pytest.skip(f"prism-cli {PRISM_VERSION} is not at {prism} (.ci/run installs it with npm)")
    spec = shared_dir() / "data" / "openai" / "openapi.yaml"
    if not spec.is_file():
        pytest.skip(f"OpenAI's spec is not at {spec} (set FAMA_SHARED_DIR to the shared/ folder)")
    port = free_port()
    log = tmp_path_factory.mktemp("prism") / "prism.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(prism), "mock", "-h", "127.0.0.1", "-p", str(port), str(spec)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, timeout=180)  # parsing the 3 MB spec takes a while
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/models", proc, log, 60)
        yield url
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture(scope="module")
def proxy(prism_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``fama serve`` (the console script's entry point) with the mock as its upstream."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FAMA_")},
        # The mock serves the Responses API: forward it rather than bridge it to chat completions.
        "FAMA_UPSTREAM_RESPONSES": "native",
    }
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    entry = "import sys; from proxy.cli import main; sys.argv[0] = 'fama'; main()"
    command = [sys.executable, "-c", entry, "serve", "--port", str(port), "--upstream-url", prism_url]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, 60)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        stop_process(proc, timeout=30)


Outcomes = dict[str, tuple[set[str], int]]  # API -> (tests passed, tests run)


def _run_sdk_tests(sdk: Path, base_url: str, report: Path) -> Outcomes:
    """The selected api_resources tests of the sdist, on its own source tree and config, against ``base_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OPENAI_"))}
    env |= {"PYTHONPATH": f"{sdk / 'src'}{os.pathsep}{sdk}", "TEST_API_BASE_URL": base_url}
    files = [f for paths in GROUPS.values() for f in paths]
    command = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
    command += ["-k", SELECTION, f"--junitxml={report}", *files]
    done = subprocess.run(command, cwd=sdk, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 1) or not report.is_file():
        pytest.fail(f"the SDK's tests did not run ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    outcomes: Outcomes = {group: (set(), 0) for group in GROUPS}
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        group = next((g for g, paths in GROUPS.items() if any(module.startswith(p.removesuffix(".py")) for p in paths)))
        passed, run = outcomes[group]
        if case.find("skipped") is None:
            run += 1
            if case.find("failure") is None and case.find("error") is None:
                passed.add(f"{case.get('classname')}::{case.get('name')}")
        outcomes[group] = (passed, run)
    return outcomes


@pytest.fixture(scope="module")
def straight(sdk_tests: Path, prism_url: str, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    return _run_sdk_tests(sdk_tests, prism_url, tmp_path_factory.mktemp("straight") / "junit.xml")


@pytest.fixture(scope="module")
def through_proxy(sdk_tests: Path, proxy: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    return _run_sdk_tests(sdk_tests, proxy[0], tmp_path_factory.mktemp("proxied") / "junit.xml")


@pytest.mark.parametrize("api", list(GROUPS))
def test_sdk_api_tests_pass_through_the_proxy_as_they_pass_straight(
    api: str, straight: Outcomes, through_proxy: Outcomes
) -> None:
    passed_straight, run_straight = straight[api]
    passed_proxied, run_proxied = through_proxy[api]
    print(
        f"{api}: {len(passed_straight)}/{run_straight} straight, {len(passed_proxied)}/{run_proxied} through the proxy"
    )
    assert run_straight > 0, f"no {api} tests ran"
    assert run_proxied == run_straight
    assert sorted(passed_straight - passed_proxied) == [], "pass straight, fail through the proxy"
    assert sorted(passed_proxied - passed_straight) == [], "fail straight, pass through the proxy"


def test_the_proxy_logged_no_failure_of_its_own(through_proxy: Outcomes, proxy: tuple[str, Path]) -> None:
    log = proxy[1].read_text(errors="replace")
    assert "Traceback" not in log
    assert "unhandled error" not in log
