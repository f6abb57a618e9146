"""Everything the proxy sends validates against OpenAI's published JSON Schemas, whatever the upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.proxy_harness import MESSAGES, TOOLS, running_proxy, schema_errors
from tests.scripted_upstream import STYLES, ScriptedUpstream
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    with serve_in_thread(ScriptedUpstream().app) as url, running_proxy(url + "/v1") as proxy:
        yield proxy


def events(proxy_url: str, body: dict[str, Any]) -> list[Any]:
    with httpx2.stream("POST", proxy_url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


@pytest.mark.parametrize("scenario", ["text", "tool"])
@pytest.mark.parametrize("style", STYLES)
def test_chat_completion_validates(proxy_url: str, openai_schemas: Path, style: str, scenario: str) -> None:
    body = {"model": f"{style}:{scenario}", "messages": MESSAGES, "tools": TOOLS}
    response = httpx2.post(proxy_url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert schema_errors(openai_schemas, "CreateChatCompletionResponse", response.json()) == []


@pytest.mark.parametrize("scenario", ["text", "tool"])
@pytest.mark.parametrize("style", STYLES)
def test_every_stream_chunk_validates(proxy_url: str, openai_schemas: Path, style: str, scenario: str) -> None:
    body = {
        "model": f"{style}:{scenario}",
        "messages": MESSAGES,
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = events(proxy_url, body)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert schema_errors(openai_schemas, "CreateChatCompletionStreamResponse", chunk) == [], chunk


@pytest.mark.parametrize("style", STYLES)
def test_midstream_error_event_validates(proxy_url: str, openai_schemas: Path, style: str) -> None:
    body = {"model": f"{style}:midstream-error", "messages": MESSAGES, "stream": True}
    *chunks, last = events(proxy_url, body)
    assert chunks
    assert schema_errors(openai_schemas, "ErrorResponse", last) == []


def test_embeddings_and_completions_validate(proxy_url: str, openai_schemas: Path) -> None:
    embedding = httpx2.post(proxy_url + "/v1/embeddings", json={"model": "e", "input": "hi"}).json()
    assert schema_errors(openai_schemas, "CreateEmbeddingResponse", embedding) == []
    completion = httpx2.post(proxy_url + "/v1/completions", json={"model": "m", "prompt": "hi"}).json()
    assert schema_errors(openai_schemas, "CreateCompletionResponse", completion) == []


@pytest.mark.parametrize("style", STYLES)
def test_model_list_and_model_validate(openai_schemas: Path, style: str) -> None:
    with serve_in_thread(ScriptedUpstream(models_style=style).app) as url, running_proxy(url + "/v1") as proxy:
        listed = httpx2.get(proxy + "/v1/models").json()
        assert schema_errors(openai_schemas, "ListModelsResponse", listed) == []
        model_id = listed["data"][0]["id"]
        model = httpx2.get(f"{proxy}/v1/models/{model_id}").json()
    assert schema_errors(openai_schemas, "Model", model) == []
    assert model["id"] == model_id
