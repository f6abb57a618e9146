"""The upstream a request reaches comes only from configuration: no header, request target, path or body field
can send the proxy's calls (with the upstream key) anywhere else, or to another path of the upstream.

A second model server stands where a hostile client would point the proxy; it must see nothing. Raw requests
go over a socket, so that request targets no HTTP client would send (absolute URIs, dot segments) arrive as
written.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from starlette.types import Receive, Scope, Send

from tests.proxy_harness import MESSAGES, TOOLS, running_proxy
from tests.scripted_upstream import Recorded, ScriptedUpstream
from tests.servers import serve_in_thread

UPSTREAM_KEY = "sk-upstream-only-for-the-model-server"


class Seen:
    """Every request that reaches a model server, routed or not: its target as sent (percent-encoded)."""

    def __init__(self) -> None:
        self.scripted = ScriptedUpstream()
        self.targets: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope["query_string"].decode()
            self.targets.append(scope["raw_path"].decode() + (f"?{query}" if query else ""))
        await self.scripted.app(scope, receive, send)

    @property
    def requests(self) -> list[Recorded]:
        return self.scripted.requests


@dataclass
class Setup:
    proxy_url: str
    upstream: Seen
    elsewhere: Seen
    elsewhere_authority: str

    def raw(self, request_line: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        host, port = self.proxy_url.removeprefix("http://").split(":")
        lines = [request_line, f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer


@pytest.fixture
def setup() -> Iterator[Setup]:
    upstream, elsewhere = Seen(), Seen()
    with (
        serve_in_thread(upstream) as upstream_url,
        serve_in_thread(elsewhere) as elsewhere_url,
        running_proxy(upstream_url + "/v1", upstream_api_key=UPSTREAM_KEY) as proxy_url,
    ):
        yield Setup(proxy_url, upstream, elsewhere, elsewhere_url.removeprefix("http://"))
    assert not elsewhere.targets, elsewhere.targets


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_headers_naming_another_host_are_ignored(setup: Setup) -> None:
    other = setup.elsewhere_authority
    client = openai.OpenAI(
        base_url=setup.proxy_url + "/v1",
        api_key="client",
        max_retries=0,
        default_headers={
            "x-forwarded-host": other,
            "x-forwarded-proto": "http",
            "x-forwarded-prefix": f"http://{other}",
            "forwarded": f"host={other};proto=http",
            "x-original-url": f"http://{other}/v1/chat/completions",
            "x-rewrite-url": f"http://{other}/v1/chat/completions",
            "x-envoy-original-path": f"http://{other}/v1/chat/completions",
        },
    )
    with client:
        client.chat.completions.create(model="openai:tool", messages=MESSAGES, tools=TOOLS)
        client.models.list()
    answer = setup.raw("GET /v1/models HTTP/1.1", {"x-forwarded-host": other})
    assert _status(answer) == 200
    assert [r.path for r in setup.upstream.requests] == ["/v1/chat/completions", "/v1/models", "/v1/models"]
    assert all(r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}" for r in setup.upstream.requests)


def test_a_host_header_or_absolute_target_naming_another_host_is_ignored(setup: Setup) -> None:
    other = setup.elsewhere_authority
    body = b'{"model": "openai:text", "messages": [{"role": "user", "content": "hi"}]}'
    json_headers = {"content-type": "application/json"}
    assert _status(setup.raw(f"POST http://{other}/v1/chat/completions HTTP/1.1", json_headers, body)) == 200
    assert _status(setup.raw(f"GET http://{other}/v1/models HTTP/1.1")) == 200
    # Host is the header a client controls most directly: send it twice, pointing elsewhere.
    host_first = setup.raw("GET /v1/models HTTP/1.1", {"Host": other})
    assert _status(host_first) in (200, 400)
    assert [r.path for r in setup.upstream.requests][:2] == ["/v1/chat/completions", "/v1/models"]


@pytest.mark.parametrize(
    "field", ["base_url", "api_base", "url", "upstream", "upstream_url", "endpoint", "host", "server_url"]
)
def test_body_fields_naming_another_server_go_to_the_configured_upstream(setup: Setup, field: str) -> None:
    client = openai.OpenAI(base_url=setup.proxy_url + "/v1", api_key="client", max_retries=0)
    with client:
        client.chat.completions.create(
            model="openai:text", messages=MESSAGES, extra_body={field: f"http://{setup.elsewhere_authority}/v1"}
        )
    [recorded] = setup.upstream.requests
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body[field] == f"http://{setup.elsewhere_authority}/v1"  # passed through as data, not followed


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/../../admin",
        "/v1/models/..%2F..%2Fadmin",
        "/v1/models/%2e%2e/%2e%2e/admin",
        "/v1/models/./../../admin",
        "/v1/models/x%3Fdebug%3D1",
        "/v1/models/x%23fragment",
        "/v1/models/@{other}/v1/models",
        "/v1/models/http:%2F%2F{other}%2Fv1%2Fmodels",
    ],
)
def test_a_model_id_cannot_leave_the_upstream_models_path(setup: Setup, target: str) -> None:
    answer = setup.raw(f"GET {target.format(other=setup.elsewhere_authority)} HTTP/1.1")
    assert _status(answer) in (400, 404), answer[:300]
    for seen in setup.upstream.targets:
        assert seen.startswith("/v1/models"), seen
        assert "?" not in seen, seen


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/files/../../admin",
        "/v1/files/%2E%2E/%2e%2E/admin",
        "/v1/files/..%2f..%2fadmin",
        "/v1/files/./x",
    ],
)
def test_a_relayed_path_cannot_leave_the_upstream_base_path(setup: Setup, target: str) -> None:
    """Every other ``/v1`` route is relayed as sent: not with dot segments, which the upstream or a proxy in front of
    it would resolve outside ``/v1``."""
    answer = setup.raw(f"GET {target} HTTP/1.1")
    assert _status(answer) == 404, answer[:300]
    assert b'"code":"unknown_url"' in answer.replace(b" ", b"")
    assert setup.upstream.targets == []


def test_relayed_paths_without_dot_segments_still_reach_the_upstream(setup: Setup) -> None:
    answer = setup.raw("GET /v1/files/file-1..2/content?x=1 HTTP/1.1")
    assert _status(answer) == 404  # the scripted upstream has no such route; the relay reached it
    assert setup.upstream.targets == ["/v1/files/file-1..2/content?x=1"]


@pytest.mark.parametrize("target", ["/v1/responses/..", "/v1/responses/%2e%2e", "/v1/responses/r%3Fdebug%3D1"])
def test_a_response_id_stays_one_segment_of_the_upstream_path(target: str) -> None:
    """With an upstream that serves the Responses API itself, an id the proxy did not store is asked of it."""
    upstream = Seen()
    with (
        serve_in_thread(upstream) as upstream_url,
        running_proxy(upstream_url + "/v1", upstream_responses="native") as url,
    ):
        setup = Setup(url, upstream, upstream, "")
        answer = setup.raw(f"GET {target} HTTP/1.1")
    assert _status(answer) == 404
    for seen in upstream.targets:
        assert seen.startswith("/v1/responses/"), seen
        assert "?" not in seen, seen
