"""The proxy in front of a real llama.cpp server with the PyPI-shipped model, seen through the official SDK.

Each test here has a counterpart ``*_quirk`` test in ``test_local_model.py`` showing what the server does
on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from jsonschema import Draft202012Validator

from proxy.local_model.model import MODEL_ALIAS, LocalModel
from tests.llama import unavailable_reason
from tests.proxy_harness import running_proxy, sdk
from tests.servers import free_port
from tests.test_local_model import ASK_WEATHER, FORCE_WEATHER, WEATHER_TOOL, tool_result_conversation

pytestmark = pytest.mark.llama

SAY_HELLO: Any = [{"role": "user", "content": "Say hello."}]
# The SDK's TypedDict parameters, from the plain dicts the direct tests send.
TOOLS: Any = [WEATHER_TOOL]
FORCE: Any = FORCE_WEATHER
ASK: Any = ASK_WEATHER


@pytest.fixture(scope="module")
def client(llama_server: LocalModel) -> Iterator[openai.OpenAI]:
    with running_proxy(llama_server.base_url) as url, sdk(url, timeout=120) as sdk_client:
        yield sdk_client


def assert_weather_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    Draft202012Validator(WEATHER_TOOL["function"]["parameters"]).validate(parsed)
    assert parsed["city"] == "Paris"


def test_streamed_text(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ALIAS, messages=SAY_HELLO, temperature=0, max_tokens=8, stream=True
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert all(p.choices[0].delta.role is None for p in parts[1:])
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert text.strip()
    assert parts[-1].choices[0].finish_reason == "length"


def test_non_streamed_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL_ALIAS, messages=SAY_HELLO, temperature=0, max_tokens=8)
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8


def test_forced_tool_call_non_streamed(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=ASK,
        tools=TOOLS,
        tool_choice=FORCE,
        temperature=0,
        max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert_weather_arguments(call.function.arguments)


def test_forced_tool_call_streamed_aggregates_to_one_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=ASK,
        tools=TOOLS,
        tool_choice=FORCE,
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    ids: list[str] = []
    names: list[str] = []
    arguments = ""
    finish = None
    for part in stream:
        choice = part.choices[0]
        finish = choice.finish_reason or finish
        for call in choice.delta.tool_calls or []:
            assert call.index == 0
            ids += [call.id] if call.id else []
            names += [call.function.name] if call.function and call.function.name else []
            arguments += call.function.arguments or "" if call.function else ""
    # The server repeats id and name in every delta; concatenated by a client they would read "get_weatherget_…".
    assert len(ids) == 1
    assert names == ["get_weather"]
    assert_weather_arguments(arguments)
    assert finish == "tool_calls"


def test_tool_result_after_an_assistant_message_with_null_content(client: openai.OpenAI) -> None:
    messages: Any = tool_result_conversation(None)  # OpenAI's own shape; the server alone answers 500
    completion = client.chat.completions.create(
        model=MODEL_ALIAS, messages=messages, tools=TOOLS, temperature=0, max_tokens=20
    )
    assert completion.choices[0].message.content


def test_include_usage_ends_with_a_choiceless_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=SAY_HELLO,
        temperature=0,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    assert parts[-1].choices == []
    # The server never reports usage in a stream, and the proxy does not invent numbers.
    assert parts[-1].usage is None
    assert all(p.choices for p in parts[:-1])


# `fama serve --local-model` as a real process


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"fama serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    pytest.fail(f"no line matching {pattern!r} within {timeout}s:\n{log.read_text(errors='replace')}")


def _wait_until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    # With several workers the parent binds the port before any worker listens on it: poll, don't trust the log.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fama serve exited with {proc.returncode}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"fama serve did not answer /healthz on port {port} within {timeout}s")


def _start_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """``fama serve --local-model`` (through the console script's entry point) with its output in a file."""
    if (reason := unavailable_reason(None)) is not None:  # whichever server `fama serve` finds
        pytest.skip(reason)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FAMA_")},
        "FAMA_LOCAL_MODEL_PORT": "0",  # any free port
        **(env or {}),
    }
    log = tmp_path / "serve.log"
    entry = "import sys; from proxy.cli import main; sys.argv[0] = 'fama'; main()"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", entry, "serve", "--local-model", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, log


@pytest.mark.parametrize(("workers", "stop_signal"), [(1, signal.SIGTERM), (2, signal.SIGINT), (1, signal.SIGHUP)])
def test_fama_serve_local_model_answers_and_stops_cleanly(
    tmp_path: Path, workers: int, stop_signal: signal.Signals
) -> None:
    port = free_port()
    proc, log = _start_serve(tmp_path, "--port", str(port), "--workers", str(workers))
    try:
        model_pid = int(_wait_for_line(log, r"local model ready at \S+ \(pid (\d+)\)", proc, 120).group(1))
        _wait_until_serving(port, proc, 60)
        with sdk(f"http://127.0.0.1:{port}", timeout=120) as client:
            completion = client.chat.completions.create(
                model=MODEL_ALIAS, messages=SAY_HELLO, temperature=0, max_tokens=5
            )
        assert completion.choices[0].message.content
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(model_pid, 0)  # the llama.cpp server went with it
    text = log.read_text()
    assert "local model stopped" in text
    # Without Redis, several workers cannot share sessions: the operator is told at startup.
    assert ("workers without FAMA_REDIS_URL" in text) == (workers > 1)


def test_fama_serve_stopped_while_the_model_loads_leaves_no_server_behind(tmp_path: Path) -> None:
    proc, log = _start_serve(tmp_path, "--port", str(free_port()))
    try:
        model_pid = int(_wait_for_line(log, r"starting local model \S+ on \S+ \(pid (\d+)\)", proc, 60).group(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(model_pid, 0)
    text = log.read_text()
    assert "local model ready" not in text  # it really was stopped during startup
    assert "stopped by SIGTERM" in text


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's exit status waits for whoever adopted it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_local_model_stops_by_itself_when_fama_serve_is_killed(tmp_path: Path) -> None:
    proc, log = _start_serve(tmp_path, "--port", str(free_port()))
    try:
        model_pid = int(_wait_for_line(log, r"local model ready at \S+ \(pid (\d+)\)", proc, 120).group(1))
        proc.kill()  # no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 30
        while not _gone(model_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(model_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fama_serve_reports_a_local_model_that_cannot_start_and_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, log = _start_serve(tmp_path, "--port", str(free_port()), env={"FAMA_LOCAL_MODEL_PORT": str(port)})
        assert proc.wait(timeout=60) == 1
    assert f"fama serve: cannot start the local model on 127.0.0.1:{port}" in log.read_text()
