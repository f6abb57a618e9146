"""The default local model server (llama.cpp's own, from the xllamacpp wheel) on the wire, directly.

What it does where llama-cpp-python's server departs from the OpenAI format (test_local_model.py), and the
one thing it does not do: honour a ``tool_choice`` naming one function.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from proxy.local_model.model import MODEL_ALIAS, LocalModel
from tests.test_local_model import ASK_WEATHER, FORCE_WEATHER, SAY_HI, WEATHER_TOOL, chunks, sse_events

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def server(xllamacpp_server: LocalModel) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=xllamacpp_server.base_url, timeout=120) as client:
        yield client


def test_models_lists_the_alias_with_created(server: httpx2.Client) -> None:
    models = server.get("/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL_ALIAS]
    assert isinstance(models[0]["created"], int)


def test_stream_ends_with_the_usage_chunk_include_usage_asks_for(server: httpx2.Client) -> None:
    request = {
        "model": MODEL_ALIAS,
        "messages": SAY_HI,
        "temperature": 0,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    parsed = chunks(events)
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"]["completion_tokens"] == 5


def test_json_schema_response_format_gets_a_schema_shaped_answer(server: httpx2.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    request = {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": "How many legs has a cat? Answer in JSON."}],
        "temperature": 0,
        "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}},
    }
    response = server.post("/chat/completions", json=request)
    assert response.status_code == 200
    assert isinstance(json.loads(response.json()["choices"][0]["message"]["content"])["answer"], int)


def test_tools_reach_the_prompt_through_the_bundled_template(server: httpx2.Client) -> None:
    base: dict[str, Any] = {"model": MODEL_ALIAS, "messages": ASK_WEATHER, "temperature": 0, "max_tokens": 1}
    plain = server.post("/chat/completions", json=base).json()["usage"]["prompt_tokens"]
    with_tools = server.post("/chat/completions", json={**base, "tools": [WEATHER_TOOL]}).json()
    assert with_tools["usage"]["prompt_tokens"] > plain + 50  # the signature and the call format are shown


def test_a_tool_choice_naming_a_function_is_ignored_quirk(server: httpx2.Client) -> None:
    request = {
        "model": MODEL_ALIAS,
        "messages": ASK_WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": FORCE_WEATHER,
        "temperature": 0,
        "max_tokens": 20,
    }
    response = server.post("/chat/completions", json=request)
    # Accepted and answered as tool_choice "auto": the 135M model writes prose instead of the forced call.
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"].get("tool_calls") is None


def test_context_overflow_is_an_openai_shaped_400_streamed_or_not(server: httpx2.Client) -> None:
    request = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "cat " * 5000}], "max_tokens": 5}
    for stream in (False, True):
        response = server.post("/chat/completions", json={**request, "stream": stream})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "exceed_context_size_error"
        assert "context size" in error["message"]
