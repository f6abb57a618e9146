"""Every code block of the README runs as pasted, or is listed here with the reason it cannot run on this machine.

A block is named by its first non-blank line (``tests/readme_blocks.py`` says how blocks run: environment prepared,
only the proxy's address rewritten to a free port). Blocks that need a proxy get a real ``fama serve``: in front of
the bundled llama.cpp model for the quick start, in enforce mode in front of a scripted model (over real HTTP) for the
intervention, outcome and Agents SDK examples. A new block that is neither in ``RUN`` nor in ``NOT_RUN`` fails
``test_every_block_is_run_or_listed`` with its line and first line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from packaging.requirements import Requirement

from detector_service.contract.profile import Mode, load_profile, profile_sha256
from proxy.supervision.injection import CLOSING, GUIDANCE_TITLE, OPENING
from tests.llama import unavailable_reason
from tests.readme_blocks import ROOT, Block, at_port, pip_targets, readme_blocks, run_bash, shape_mismatch, shell_env
from tests.recorded_sessions import ADMIN, FAILED, FALSE_ALARMS, GOOD, record_outcomes, running
from tests.servers import free_port, serve_in_thread, start_fama_serve, stop_process, wait_for_port
from tests.supervised_upstream import ScriptedModel, call, feedback_in
from tests.supervision_harness import CANCEL, QUESTION

BLOCKS = readme_blocks()

QUICK_START_SERVE = "fama serve --local-model"
QUICK_START_CURL = "curl -sN localhost:8080/v1/chat/completions -H 'content-type: application/json' \\"
INTERVENTION = (
    "curl -sN localhost:8080/v1/chat/completions -H 'content-type: application/json' -H 'X-FAMA-Session: demo-1' -d '{"
)
INTERVENTION_OUTPUT = 'data: {"id":...,"choices":[{"index":0,"delta":{"role":"assistant","content":null},...}]}'
OUTCOME = "curl -s localhost:8080/v1/fama/sessions/demo-1/outcome -H 'authorization: Bearer KEY' \\"
OUTCOME_OUTPUT = (
    '{"object":"fama.session.outcome","session_id":"demo-1","outcome":"success","reward":1.0,"intervened":true}'
)
AGENTS_APP = "import asyncio"
RECORDED_RUNS = 'DATA="${FAMA_SHARED_DIR:-../shared}/data/tau"'
CONTEXT = OPENING
RELOAD = "fama profile push profiles/airline.yaml --url http://127.0.0.1:8080 --admin-key ADMIN"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate"
OBSERVE_TO_ENFORCE = 'PROFILE="${FAMA_PROFILE:-profiles/airline.yaml}"   # the profile in force'
EMBEDDED_EXPORT = "curl -sf 'localhost:8080/admin/sessions/export?last=7d&with_outcome_only=true&redact=true' \\"
TEST_SUITE = "apt-get update && apt-get install -y redis-server prometheus   # as root, or with sudo"

# Blocks run (or, for output, compared with what the block before printed) here: key -> the test that does it.
RUN = {
    QUICK_START_SERVE: "test_quick_start_streams_through_the_local_model",
    QUICK_START_CURL: "test_quick_start_streams_through_the_local_model",
    INTERVENTION: "test_intervention_and_outcome_examples",
    INTERVENTION_OUTPUT: "test_intervention_and_outcome_examples",
    OUTCOME: "test_intervention_and_outcome_examples",
    OUTCOME_OUTPUT: "test_intervention_and_outcome_examples",
    AGENTS_APP: "test_agents_sdk_example",
    RECORDED_RUNS: "test_recorded_runs_example",
    CONTEXT: "test_injected_context_example_has_the_shape_the_proxy_writes",
    RELOAD: "test_reload_example",
    OBSERVE_TO_ENFORCE: "test_observe_to_enforce_example",
    EMBEDDED_EXPORT: "test_embedded_export_example",
}
# Blocks not run here: key -> why, and what checks them instead. Every bash block also passes ``bash -n``.
NOT_RUN = {
    INSTALL: "installs from the network and builds llama.cpp (minutes): test_install_blocks_resolve checks "
    "that its extras exist in pyproject.toml and its other packages are the ones installed here",
    TEST_SUITE: "installs system packages as root and runs the whole suite, this test included: "
    "test_install_blocks_resolve checks its pip line",
    "# Overhead benchmark (direct vs proxy in the same run) and detector throughput": "benchmarks, minutes of CPU "
    "on a shared 2-core machine; tests/test_bench.py covers fama bench's measurements",
    "cp .env.example .env             # set VLLM_MODEL, HF_TOKEN (gated models), GRAFANA_ADMIN_PASSWORD": "docker "
    "compose with vLLM on an NVIDIA GPU; the compose files are validated by tests/test_ops_compose.py",
    "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d --build": "needs a Docker engine; "
    "tests/test_ops_compose.py validates the files",
    "kubectl create namespace fama": "needs a Kubernetes cluster with KEDA; tests/test_ops_k8s.py renders and "
    "validates the manifests",
    "pip install -e '.[eval]'": "a GPU host with vLLM, minutes per episode; tests/test_eval_tau2.py runs fama eval "
    "tau2 on scripted models (--proxy-url included) and tests/test_eval_tau2_local.py on the bundled model",
}


def block(key: str) -> Block:
    found = [b for b in BLOCKS if b.key == key]
    assert len(found) == 1, f"README.md has {len(found)} blocks starting {key!r}: update tests/test_readme.py"
    return found[0]


def test_every_block_is_run_or_listed() -> None:
    unclassified = [b.where() for b in BLOCKS if b.key not in RUN and b.key not in NOT_RUN]
    assert not unclassified, (
        "README code blocks neither run nor listed; add each to RUN (with a test that runs it) or to NOT_RUN (with "
        "the reason) in tests/test_readme.py:\n" + "\n".join(unclassified)
    )
    keys = [b.key for b in BLOCKS]
    assert len(keys) == len(set(keys)), (
        f"blocks must start with distinct lines: {sorted(k for k in keys if keys.count(k) > 1)}"
    )
    stale = sorted((set(RUN) | set(NOT_RUN)) - set(keys))
    assert not stale, f"listed in tests/test_readme.py but no README block starts so: {stale}"
    assert not set(RUN) & set(NOT_RUN)
    assert all(name in globals() for name in RUN.values()), "RUN names a test this module does not have"


def test_every_bash_block_parses_and_needs_no_sudo() -> None:
    for b in (b for b in BLOCKS if b.lang in ("bash", "sh", "shell")):
        check = subprocess.run(["bash", "-n", "-c", b.text], capture_output=True, text=True)
        assert check.returncode == 0, f"{b.where()}: {check.stderr}"
        # A root shell (a container, a fresh VM) often has no sudo: the README says "as root, or with sudo" instead.
        assert not any(line.split()[:1] == ["sudo"] for line in b.text.splitlines()), b.where()


def test_install_blocks_resolve() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = pyproject["optional-dependencies"]
    minimum = pyproject["requires-python"].removeprefix(">=")
    assert f"Python {minimum} or newer" in (ROOT / "README.md").read_text()
    targets = [t for key in (INSTALL, TEST_SUITE) for targets in pip_targets(block(key).text) for t in targets]
    assert targets, "no pip install found in the install blocks"
    for target in targets:
        if target.startswith("."):  # this checkout, with extras
            requirement = Requirement("fama-proxy" + target[1:])
            assert requirement.extras <= set(extras), f"pip install {target}: pyproject.toml has no such extra"
            continue
        name = Requirement(target).name
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} (installed by the README) is not installed here")


def test_injected_context_example_has_the_shape_the_proxy_writes() -> None:
    lines = block(CONTEXT).text.strip().splitlines()
    assert lines[0] == OPENING
    assert lines[-1] == CLOSING
    assert f"## {GUIDANCE_TITLE}" in lines
    assert all(line.startswith(("## ", "- ")) for line in lines[1:-1]), lines


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bin")


@contextlib.contextmanager
def _served_block(text: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A block that starts a server, run in the background (its own process group) until the ``with`` ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", text],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx2.TransportError):
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the quick start's fama serve is not serving (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")


def test_quick_start_streams_through_the_local_model(tmp_path: Path, bin_dir: Path) -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    port = free_port()
    env = shell_env(bin_dir, FAMA_PORT=str(port), FAMA_LOCAL_MODEL_PORT="0")
    log = tmp_path / "serve.log"
    with _served_block(block(QUICK_START_SERVE).text, env, log) as serve:
        _wait_healthy(port, serve, log, timeout=180)
        done = run_bash(at_port(block(QUICK_START_CURL).text, port), tmp_path, env, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line]
    # Server-sent events; a slow model gets keep-alive comments (": ping") between them.
    assert all(line.startswith(("data: ", ":")) for line in lines), done.stdout[-2000:]
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", done.stdout[-2000:]
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), done.stdout[:2000]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text.strip(), "the model streamed no text"


DONE = "Your reservation ZFA04Y is cancelled."
LOOK_UP = call("get_reservation_details", '{"reservation_id": "ZFA04Y"}', "call_0")


def hasty_airline_model(body: dict[str, Any]) -> dict[str, Any]:
    """Looks the reservation up when it can, then cancels without asking; asks only when the proxy says so."""
    if feedback_in(body):
        return {"content": QUESTION}
    messages = body["messages"]
    if messages[-1]["role"] == "tool" and "cancelled" in str(messages[-1]["content"]):
        return {"content": DONE}
    tools = {t["function"]["name"] for t in body.get("tools") or []}
    if "get_reservation_details" in tools and not any(m["role"] == "tool" for m in messages):
        return {"tool_calls": [LOOK_UP]}
    return {"tool_calls": [CANCEL]}


@pytest.fixture(scope="module")
def enforce_proxy() -> Iterator[int]:
    """``fama serve --mode enforce`` (embedded detectors) in front of the hasty model; yields its port."""
    with serve_in_thread(ScriptedModel(hasty_airline_model).app) as upstream:
        port = free_port()
        proc = start_fama_serve(upstream + "/v1", port, MODE="enforce")
        try:
            wait_for_port(port)
            yield port
        finally:
            stop_process(proc)
            assert proc.stderr is not None
            proc.stderr.close()


def test_intervention_and_outcome_examples(enforce_proxy: int, tmp_path: Path, bin_dir: Path) -> None:
    env = shell_env(bin_dir)
    stream = run_bash(at_port(block(INTERVENTION).text, enforce_proxy), tmp_path, env)
    assert stream.returncode == 0, stream.stderr
    problem = shape_mismatch(block(INTERVENTION_OUTPUT).text, stream.stdout)
    assert problem is None, problem
    # The outcome of the session the stream above named (demo-1), which the proxy changed.
    outcome = run_bash(at_port(block(OUTCOME).text, enforce_proxy), tmp_path, env)
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads(outcome.stdout) == json.loads(block(OUTCOME_OUTPUT).text)


def test_agents_sdk_example(enforce_proxy: int, tmp_path: Path, bin_dir: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(at_port(block(AGENTS_APP).text, enforce_proxy))
    done = subprocess.run(
        [sys.executable, str(app)], cwd=tmp_path, env=shell_env(bin_dir), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, reservations = done.stdout.strip().splitlines()
    assert first == QUESTION  # the unconfirmed cancellation was refused and the model asked instead
    assert second == DONE
    assert "'status': 'cancelled'" in reservations  # after the user's yes, the app's tool ran


def test_recorded_runs_example(tau_dir: Path, shared: Path, tmp_path: Path, bin_dir: Path) -> None:
    done = run_bash(block(RECORDED_RUNS).text, tmp_path, shell_env(bin_dir, FAMA_SHARED_DIR=str(shared.resolve())))
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "out.json").read_text())["records"]
    source = tau_dir / "trajectories" / "tau2-bench__airline__qwen2.5-7b__base50__gym.jsonl"
    assert len(records) == sum(1 for line in source.read_text().splitlines() if line.strip())
    assert all("flags" in r for r in records)
    assert yaml.safe_load((tmp_path / "profile.yaml").read_text())["version"] == 1


def test_reload_example(tmp_path: Path, bin_dir: Path) -> None:
    # As the README says: a proxy started with FAMA_ADMIN_KEY=ADMIN; the block runs from the checkout (profiles/).
    with serve_in_thread(ScriptedModel(hasty_airline_model).app) as upstream:
        port = free_port()
        proc = start_fama_serve(upstream + "/v1", port, ADMIN_KEY="ADMIN")
        try:
            wait_for_port(port)
            done = run_bash(at_port(block(RELOAD).text, port), ROOT, shell_env(bin_dir))
        finally:
            stop_process(proc)
            assert proc.stderr is not None
            proc.stderr.close()
    assert done.returncode == 0, done.stderr
    printed, answers = done.stdout.split("\n", 1)  # the command's line, then the two curls' bodies back to back
    comment = next(line for line in block(RELOAD).text.splitlines() if line.startswith("# "))
    problem = shape_mismatch(comment.removeprefix("# "), printed)
    assert problem is None, problem
    posted, end = json.JSONDecoder().raw_decode(answers)
    shown = json.loads(answers[end:])
    airline, retail = (load_profile(ROOT / "profiles" / f"{name}.yaml") for name in ("airline", "retail"))
    assert json.loads(printed) == {"version": 1, "sha256": profile_sha256(airline), "source": "pushed"}
    assert (posted["version"], posted["sha256"]) == (2, profile_sha256(retail))
    assert (shown["version"], shown["name"], shown["source"]) == (2, "retail", "pushed")


@pytest.mark.redis
def test_observe_to_enforce_example(redis_url: str, tmp_path: Path, bin_dir: Path) -> None:
    with running(tmp_path, Mode.OBSERVE, redis_url) as proxy:
        record_outcomes(proxy)
    env = shell_env(bin_dir, FAMA_REDIS_URL=redis_url, FAMA_PROFILE=str(ROOT / "profiles" / "airline.yaml"))
    done = run_bash(block(OBSERVE_TO_ENFORCE).text, tmp_path, env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = (tmp_path / "sessions.jsonl").read_text().splitlines()
    assert len(exported) == FAILED + FALSE_ALARMS + GOOD
    assert done.stdout.count("sessions enforce mode would act on") == 2  # the report, then with the candidate
    assert "candidate" in done.stdout
    calibrated = load_profile(tmp_path / "profile.new.yaml")
    assert calibrated.calibration is not None
    assert (calibrated.calibration.failed, calibrated.calibration.passed) == (FAILED, FALSE_ALARMS + GOOD)


def test_embedded_export_example(tmp_path: Path, bin_dir: Path) -> None:
    with running(tmp_path, Mode.OBSERVE, None) as proxy:
        record_outcomes(proxy)
        port = int(proxy.url.rsplit(":", 1)[1])
        done = run_bash(at_port(block(EMBEDDED_EXPORT).text, port), tmp_path, shell_env(bin_dir, FAMA_ADMIN_KEY=ADMIN))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    assert len(records) == FAILED + FALSE_ALARMS + GOOD
    assert all(r["outcome"] in ("success", "failure") for r in records)
