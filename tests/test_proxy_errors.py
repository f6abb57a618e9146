"""Every error class, as the official SDK sees it, with OpenAI-shaped bodies that validate."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.proxy_harness import MESSAGES, running_proxy, schema_errors, sdk
from tests.scripted_upstream import STYLES, ScriptedUpstream
from tests.servers import refused_url, serve_in_thread


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve_in_thread(ScriptedUpstream().app) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def proxy_url(upstream_url: str) -> Iterator[str]:
    with running_proxy(upstream_url) as url:
        yield url


@pytest.fixture
def client(proxy_url: str) -> Iterator[openai.OpenAI]:
    with sdk(proxy_url) as client:
        yield client


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    error: dict[str, Any] = body["error"]
    return error


def assert_openai_shaped(schemas: Path, response: httpx2.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert schema_errors(schemas, "ErrorResponse", body) == []
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "messages": [', None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": {}}', "tools"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": ["x"]}', "tools[0]"),
        (
            b'{"model": "m", "messages": [{"role": "user"}, {"role": "assistant", "tool_calls": "x"}]}',
            "messages[1].tool_calls",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}, {"role": "assistant", "tool_calls": [5]}]}',
            "messages[1].tool_calls[0]",
        ),
        (
            b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": "f"}]}]}',
            "messages[0].tool_calls[0].function",
        ),
        (
            b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": [], "function": {}}]}]}',
            "messages[0].tool_calls[0].id",
        ),
        (
            b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]}',
            "messages[0].tool_calls[0].function.name",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (
            b'{"model": "m", "messages": [{"role": "tool", "tool_call_id": [1], "content": "x"}]}',
            "messages[0].tool_call_id",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "function", "function": "x"}]}',
            "tools[0].function",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "tools": [{"function": {"name": "a", "parameters": "no"}}]}',
            "tools[0].function.parameters",
        ),
        (b'{"model": "m", "messages": [{"role": "user"}], "tool_choice": 5}', "tool_choice"),
        (b'{"model": "m", "messages": [{"role": "user"}], "response_format": [1]}', "response_format"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(
    proxy_url: str, openai_schemas: Path, body: bytes, param: str | None
) -> None:
    response = httpx2.post(
        proxy_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = assert_openai_shaped(openai_schemas, response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_invalid_request_raises_bad_request_in_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[])
    assert caught.value.param == "messages"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_upstream_error_status_is_kept_with_a_normalized_body(
    client: openai.OpenAI,
    proxy_url: str,
    openai_schemas: Path,
    style: str,
    status: int,
    exc_type: type[openai.APIStatusError],
) -> None:
    with pytest.raises(exc_type) as caught:
        client.chat.completions.create(model=f"{style}:error-{status}", messages=MESSAGES)
    assert caught.value.status_code == status
    error = error_of(caught.value)
    assert error["message"] == f"scripted {status} from {style}"
    assert error["code"] is None or isinstance(error["code"], str)
    assert schema_errors(openai_schemas, "ErrorResponse", caught.value.response.json()) == []
    # the streaming request fails the same way, before any event
    with pytest.raises(exc_type):
        client.chat.completions.create(model=f"{style}:error-{status}", messages=MESSAGES, stream=True)


def test_numeric_vllm_code_becomes_a_string(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="vllm:error-400", messages=MESSAGES)
    assert error_of(caught.value)["code"] == "400"
    assert error_of(caught.value)["type"] == "BadRequestError"


def test_tgi_flat_error_is_mapped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="tgi:error-422", messages=MESSAGES)
    error = error_of(caught.value)
    assert (error["type"], error["code"]) == ("invalid_request_error", "validation")


def test_429_passes_retry_after_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="openai:error-429", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"
    assert error_of(caught.value)["code"] == "rate_limit_exceeded"


def test_unknown_route_and_wrong_method(proxy_url: str, openai_schemas: Path) -> None:
    missing = httpx2.post(proxy_url + "/nothing/here", json={})
    assert missing.status_code == 404
    assert assert_openai_shaped(openai_schemas, missing)["code"] == "unknown_url"
    assert missing.headers["x-request-id"]
    own = httpx2.delete(proxy_url + "/v1/fama/sessions/s1/outcome")  # the proxy's own: never relayed
    assert own.status_code == 404
    assert assert_openai_shaped(openai_schemas, own)["code"] == "unknown_url"
    wrong = httpx2.post(proxy_url + "/healthz")
    assert wrong.status_code == 405
    assert assert_openai_shaped(openai_schemas, wrong)["code"] == "method_not_allowed"


def test_other_v1_routes_answer_with_the_upstreams_status(proxy_url: str, openai_schemas: Path) -> None:
    """Relayed (see tests/test_proxy_relay.py): the scripted upstream has no such routes."""
    missing = httpx2.post(proxy_url + "/v1/assistants", json={})
    assert missing.status_code == 404
    assert_openai_shaped(openai_schemas, missing)
    with sdk(proxy_url) as client, pytest.raises(openai.NotFoundError):
        client.files.list()


def test_connect_refused_is_502(openai_schemas: Path) -> None:
    with refused_url() as upstream, running_proxy(upstream, connect_timeout_s=2) as proxy, sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="openai:text", messages=MESSAGES)
        assert caught.value.status_code == 502
        assert error_of(caught.value)["code"] == "upstream_unreachable"
        readiness = httpx2.get(proxy + "/readyz")
        assert readiness.status_code == 503
        assert_openai_shaped(openai_schemas, readiness)
        assert httpx2.get(proxy + "/healthz").status_code == 200


def test_upstream_timeout_is_504(upstream_url: str) -> None:
    with running_proxy(upstream_url, read_timeout_s=0.3) as proxy, sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="openai:hang", messages=MESSAGES)
        assert caught.value.status_code == 504
        assert error_of(caught.value)["code"] == "upstream_timeout"
        with pytest.raises(openai.InternalServerError) as streamed:
            client.chat.completions.create(model="openai:hang", messages=MESSAGES, stream=True)
        assert streamed.value.status_code == 504


@pytest.mark.parametrize("style", STYLES)
def test_midstream_error_raises_api_error(client: openai.OpenAI, style: str) -> None:
    stream = client.chat.completions.create(model=f"{style}:midstream-error", messages=MESSAGES, stream=True)
    assert next(stream).choices[0].delta.role == "assistant"  # the failure comes after content started
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "scripted failure during generation" in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_empty_upstream_stream_raises_api_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="llamacpp:empty-stream", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "ended the stream without sending anything" in caught.value.message


@pytest.mark.parametrize("scenario", ["drop", "bad-json"])
def test_broken_upstream_stream_raises_api_error(client: openai.OpenAI, proxy_url: str, scenario: str) -> None:
    stream = client.chat.completions.create(model=f"vllm:{scenario}", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.body is not None
    metrics = httpx2.get(proxy_url + "/metrics").text
    assert 'fama_upstream_errors_total{kind="stream"}' in metrics


def test_auth_required_when_keys_are_configured(upstream_url: str, openai_schemas: Path) -> None:
    with running_proxy(upstream_url, api_keys="key-alpha-1,key-beta-2") as proxy:
        with sdk(proxy, api_key="wrong-key") as wrong, pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model="openai:text", messages=MESSAGES)
        assert error_of(caught.value)["code"] == "invalid_api_key"
        missing = httpx2.post(proxy + "/v1/chat/completions", json={"model": "openai:text", "messages": MESSAGES})
        assert missing.status_code == 401
        assert assert_openai_shaped(openai_schemas, missing)["code"] == "invalid_api_key"
        with sdk(proxy, api_key="key-beta-2") as right:
            ok = right.chat.completions.create(model="openai:text", messages=MESSAGES)
        assert ok.choices[0].message.content
        assert httpx2.get(proxy + "/healthz").status_code == 200  # probes need no key


def test_a_stalled_request_body_is_408_and_nothing_reaches_upstream(openai_schemas: Path) -> None:
    # Headers promise 200 bytes; 20 arrive, then nothing: the proxy answers once its body deadline passes.
    upstream = ScriptedUpstream()
    with (
        serve_in_thread(upstream.app) as upstream_url,
        running_proxy(upstream_url + "/v1", request_read_timeout_s=0.5) as url,
    ):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 200\r\n\r\n" + b'{"model": "openai:t'
            )
            started = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                piece = conn.recv(65536)
                if not piece:
                    break
                answer += piece
            waited = time.monotonic() - started
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    body = json.loads(payload)
    assert body["error"]["code"] == "request_timeout"
    assert not schema_errors(openai_schemas, "ErrorResponse", body)
    assert 0.4 < waited < 5
    assert upstream.requests == []


def test_a_body_over_the_cap_is_413_declared_or_streamed(upstream_url: str, openai_schemas: Path) -> None:
    with running_proxy(upstream_url, max_request_bytes=4096) as url:
        declared = httpx2.post(url + "/v1/chat/completions", content=b" " * 10_000)
        streamed = httpx2.post(url + "/v1/chat/completions", content=iter([b" " * 3000] * 4))  # chunked
        with sdk(url) as client, pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="openai:text", messages=[{"role": "user", "content": "x" * 5000}])
    for response in (declared, streamed):
        assert response.status_code == 413
        assert assert_openai_shaped(openai_schemas, response)["code"] == "request_too_large"
    assert streamed.request.headers["transfer-encoding"] == "chunked"  # no length to refuse up front
    assert caught.value.status_code == 413
