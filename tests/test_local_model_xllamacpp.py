"""The default local model server (llama.cpp's own, from the xllamacpp wheel) on the wire, directly.

What it does where llama-cpp-python's server departs from the OpenAI format (test_local_model.py), and the
two things it does not do: honour a ``tool_choice`` naming one function, and keep a connection open after a streamed
answer (it closes it while advertising keep-alive; the proxy sends a request that meets such a connection once
more, on a new one).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import orjson
import pytest

from proxy.local_model.model import MODEL_ALIAS, LocalModel
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace
from proxy.upstream.client import Upstream
from tests.test_local_model import ASK_WEATHER, FORCE_WEATHER, SAY_HI, WEATHER_TOOL, chunks, sse_events

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def server(xllamacpp_server: LocalModel) -> Iterator[httpx2.Client]:
    # A new connection per request: the server ends its connection after a streamed answer (quirk test below), and a
    # request that met that connection as it closes would fail for a reason that is not the one a test names.
    limits = httpx2.Limits(max_keepalive_connections=0)
    with httpx2.Client(base_url=xllamacpp_server.base_url, timeout=120, limits=limits) as client:
        yield client


def _raw_exchange(base_url: str, body: dict[str, Any]) -> tuple[bytes, bool]:
    """One HTTP/1.1 request on a socket of its own: the bytes that came back, and whether the server closed it."""
    parts = urlsplit(base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    received = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head + payload)
        while True:
            sock.settimeout(60 if not received.endswith((b"0\r\n\r\n", b"}")) else 2)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return received, False
            if not data:
                return received, True
            received += data


def test_a_streamed_answer_ends_its_connection_despite_keep_alive_quirk(xllamacpp_server: LocalModel) -> None:
    request = {"model": MODEL_ALIAS, "messages": SAY_HI, "temperature": 0, "max_tokens": 3}
    streamed, closed = _raw_exchange(xllamacpp_server.base_url, {**request, "stream": True})
    assert re.search(rb"(?i)keep-alive: timeout=\d+", streamed)  # it says it keeps the connection
    assert streamed.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert closed  # and closes it right after the last chunk
    whole, closed = _raw_exchange(xllamacpp_server.base_url, request)
    assert b'"choices"' in whole
    assert not closed  # a whole answer keeps it


def test_the_proxy_sends_a_request_that_meets_the_closed_connection_again(xllamacpp_server: LocalModel) -> None:
    """The proxy's upstream client, on its pooled connection: a stream, then at once a whole answer (what an agent
    loop does when its tool is quick). The connection the stream leaves is closed as it is reused; the request goes
    out once more on a new one and the caller never sees the failure."""
    metrics = ProxyMetrics()
    request = {"model": MODEL_ALIAS, "messages": SAY_HI, "temperature": 0, "max_tokens": 3}

    async def stream_then_whole() -> list[bytes]:
        upstream = Upstream(ProxySettings(upstream_url=xllamacpp_server.base_url), metrics)
        answers = []
        try:
            headers = upstream.headers(None, "req-1")
            for stream in (True, False, True, False, True, False):
                body = orjson.dumps({**request, "stream": stream})
                reply = await upstream.open("POST", "/chat/completions", headers, Trace("req-1"), body)
                try:
                    answers.append(await upstream.read(reply))
                finally:
                    reply.close()
        finally:
            await upstream.aclose()
        return answers

    answers = asyncio.run(stream_then_whole())
    assert [a.endswith(b"data: [DONE]\n\n") for a in answers] == [True, False] * 3
    assert all(b'"choices"' in a for a in answers)
    assert metrics.upstream_errors.labels("closed")._value.get() >= 1  # it happened, and nobody saw it
    assert metrics.upstream_errors.labels("connect")._value.get() == 0


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
