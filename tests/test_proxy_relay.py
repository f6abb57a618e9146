"""The ``/v1/*`` routes the proxy has none of its own for, and ``/v1/models/{id}``: the official SDK and httpx2
through the proxy, both on real uvicorn servers, against a scripted upstream that records what reaches it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx2
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.proxy_harness import running_proxy, sdk
from tests.servers import refused_url, serve_in_thread

MODEL = {"id": "m-1", "object": "model", "created": 1, "owned_by": "the-model-route"}
LISTED = {"id": "m-1", "object": "model", "created": 1, "owned_by": "the-list"}
CHUNK = b"x" * 65536


@dataclass
class Seen:
    method: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body_size: int


@dataclass
class RelayUpstream:
    """A model server with routes the proxy does not serve itself. ``models_route`` is how ``/models/{id}``
    answers: ``ok``, ``absent`` (a framework 404), ``405`` or ``unknown`` (OpenAI's 404 about the model)."""

    models_route: str = "ok"
    seen: list[Seen] = field(default_factory=list)
    first_part_in: threading.Event = field(default_factory=threading.Event)
    client_read_first: threading.Event = field(default_factory=threading.Event)
    stream_finished: threading.Event = field(default_factory=threading.Event)
    endless_stopped: threading.Event = field(default_factory=threading.Event)

    async def _record(self, request: Request) -> Seen:
        size = 0
        async for part in request.stream():
            if part and not self.first_part_in.is_set():
                self.first_part_in.set()
            size += len(part)
        seen = Seen(
            request.method,
            request.scope["raw_path"].decode(),
            request.scope["query_string"].decode(),
            dict(request.headers),
            size,
        )
        self.seen.append(seen)
        return seen

    async def echo(self, request: Request) -> Response:
        seen = await self._record(request)
        headers = [
            ("x-upstream", "yes"),
            ("connection", "x-hop"),
            ("x-hop", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]
        response = JSONResponse({"method": seen.method, "size": seen.body_size}, status_code=201)
        response.raw_headers += [(k.encode(), v.encode()) for k, v in headers]
        return response

    async def stream(self, request: Request) -> Response:
        await self._record(request)

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            # The rest only once the client holds the first event: a relay that buffers never gets there.
            if not await asyncio.to_thread(self.client_read_first.wait, 10):
                return
            yield b'data: {"n": 2}\n\n'
            yield b"data: [DONE]\n\n"
            self.stream_finished.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def endless(self, request: Request) -> Response:
        await self._record(request)

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b'data: {"n": 0}\n\n'
                    await asyncio.sleep(0.05)
            finally:
                self.endless_stopped.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def broken(self, request: Request) -> Response:
        await self._record(request)

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n' if request.query_params.get("sse") else CHUNK
            raise RuntimeError("the model server crashed mid-stream")

        media_type = "text/event-stream" if request.query_params.get("sse") else "application/octet-stream"
        return StreamingResponse(events(), media_type=media_type)

    async def error(self, request: Request) -> Response:
        await self._record(request)
        return Response("<html>overloaded</html>", status_code=503, headers={"retry-after": "3"})

    async def hang(self, request: Request) -> Response:
        await self._record(request)
        await asyncio.sleep(5)
        return JSONResponse({})

    async def model(self, request: Request) -> Response:
        seen = await self._record(request)
        if seen.method == "DELETE":
            return JSONResponse({"id": request.path_params["model_id"], "object": "model", "deleted": True})
        if self.models_route == "absent":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if self.models_route == "405":
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405)
        if self.models_route == "unknown":
            error = {"message": "The model 'm-1' does not exist", "type": "invalid_request_error"}
            return JSONResponse({"error": {**error, "param": "model", "code": "model_not_found"}}, status_code=404)
        return JSONResponse(MODEL)

    async def models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"object": "list", "data": [LISTED]})

    @property
    def app(self) -> Starlette:
        every = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return Starlette(
            routes=[
                Route("/v1/models", self.models),
                Route("/v1/models/{model_id:path}", self.model, methods=["GET", "DELETE"]),
                Route("/v1/stream", self.stream, methods=["GET", "POST"]),
                Route("/v1/broken", self.broken),
                Route("/v1/endless", self.endless),
                Route("/v1/error", self.error, methods=every),
                Route("/v1/hang", self.hang),
                Route("/v1/{rest:path}", self.echo, methods=every),
            ]
        )


@pytest.fixture
def upstream() -> Iterator[tuple[RelayUpstream, str]]:
    scripted = RelayUpstream()
    with serve_in_thread(scripted.app) as url:
        yield scripted, url + "/v1"


@pytest.fixture
def proxy_url(upstream: tuple[RelayUpstream, str]) -> Iterator[str]:
    with running_proxy(upstream[1]) as url:
        yield url


def test_method_path_query_body_status_and_headers_pass_as_they_are(
    upstream: tuple[RelayUpstream, str], proxy_url: str
) -> None:
    scripted = upstream[0]
    response = httpx2.patch(
        proxy_url + "/v1/vector_stores/vs%2F1/files",
        params=[("a", "1"), ("a", "2"), ("q", "x y")],
        content=b'{"attributes": {}}',
        headers={
            "content-type": "application/json",
            "x-custom": "kept",
            "connection": "x-client-hop",
            "x-client-hop": "no",
        },
    )
    assert response.status_code == 201
    assert response.json() == {"method": "PATCH", "size": 18}
    (seen,) = scripted.seen
    assert (seen.method, seen.raw_path, seen.query) == ("PATCH", "/v1/vector_stores/vs%2F1/files", "a=1&a=2&q=x+y")
    assert seen.headers["x-custom"] == "kept"
    assert seen.headers["content-type"] == "application/json"
    assert "x-client-hop" not in seen.headers
    assert seen.headers["x-request-id"] == response.headers["x-request-id"]
    assert response.headers["x-upstream"] == "yes"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert "x-hop" not in response.headers
    assert "keep-alive" not in response.headers


def test_sdk_calls_on_routes_the_proxy_does_not_serve(upstream: tuple[RelayUpstream, str], proxy_url: str) -> None:
    scripted = upstream[0]
    with sdk(proxy_url) as client:
        created = client.files.with_raw_response.create(file=("notes.jsonl", b'{"a": 1}\n' * 1000), purpose="batch")
        deleted = client.models.delete("ft:m-1:org")
    assert created.status_code == 201
    assert scripted.seen[0].method == "POST"
    assert scripted.seen[0].headers["content-type"].startswith("multipart/form-data; boundary=")
    assert scripted.seen[0].body_size > 9000
    assert deleted.deleted is True
    assert deleted.id == "ft:m-1:org"
    assert (scripted.seen[1].method, scripted.seen[1].raw_path) == ("DELETE", "/v1/models/ft:m-1:org")


def test_request_body_is_streamed_to_the_upstream(upstream: tuple[RelayUpstream, str], proxy_url: str) -> None:
    scripted = upstream[0]

    def body() -> Iterator[bytes]:
        yield CHUNK
        # The rest only once the upstream has the first part: a relay that reads the whole body first never gets it.
        assert scripted.first_part_in.wait(10), "the upstream got nothing before the body was complete"
        for _ in range(63):
            yield CHUNK

    response = httpx2.post(proxy_url + "/v1/uploads/u1/parts", content=body(), timeout=30)
    assert response.status_code == 201
    assert response.json()["size"] == 64 * len(CHUNK)


def test_response_stream_is_relayed_as_it_comes(upstream: tuple[RelayUpstream, str], proxy_url: str) -> None:
    scripted = upstream[0]
    with httpx2.stream("POST", proxy_url + "/v1/stream", json={"stream": True}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == 'data: {"n": 1}'
        assert not scripted.stream_finished.is_set()
        scripted.client_read_first.set()
        rest = [line for line in lines if line]
    assert rest == ['data: {"n": 2}', "data: [DONE]"]


def test_a_client_leaving_a_stream_ends_the_upstream_request(
    upstream: tuple[RelayUpstream, str], proxy_url: str
) -> None:
    scripted = upstream[0]
    with httpx2.stream("GET", proxy_url + "/v1/endless", timeout=30) as response:
        assert next(response.iter_lines()) == 'data: {"n": 0}'
    assert scripted.endless_stopped.wait(10)


def test_a_broken_event_stream_ends_with_an_error_event(proxy_url: str) -> None:
    with httpx2.stream("GET", proxy_url + "/v1/broken?sse=1", timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == 'data: {"n": 1}'
    assert lines[-1].startswith('data: {"error":')
    assert '"code":"upstream_stream_error"' in lines[-1]
    assert "fama_upstream_errors_total" in httpx2.get(proxy_url + "/metrics").text


def test_a_broken_download_is_cut_short_not_ended(proxy_url: str) -> None:
    with httpx2.stream("GET", proxy_url + "/v1/broken", timeout=30) as response:
        assert response.status_code == 200
        with pytest.raises(httpx2.RemoteProtocolError):
            response.read()


def test_upstream_errors_keep_their_status_in_openai_shape(proxy_url: str) -> None:
    with sdk(proxy_url) as client, pytest.raises(openai.InternalServerError) as caught:
        client.post("/error", cast_to=object, body={})
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "3"
    error = caught.value.response.json()["error"]
    assert error["message"] == "<html>overloaded</html>"
    assert error["type"] == "server_error"


def test_upstream_down_is_502_and_silent_is_504(upstream: tuple[RelayUpstream, str]) -> None:
    with refused_url() as refusing, running_proxy(refusing) as proxy:
        down = httpx2.get(proxy + "/v1/batches/b1")
    assert down.status_code == 502
    assert down.json()["error"]["code"] == "upstream_unreachable"
    with running_proxy(upstream[1], read_timeout_s=0.3) as proxy:
        silent = httpx2.get(proxy + "/v1/hang")
    assert silent.status_code == 504
    assert silent.json()["error"]["code"] == "upstream_timeout"


def test_oversized_body_is_413(upstream: tuple[RelayUpstream, str]) -> None:
    with running_proxy(upstream[1], max_request_bytes=1000) as proxy:
        response = httpx2.post(proxy + "/v1/files", content=(CHUNK for _ in range(4)))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("upstream_key", "sent"), [(None, "Bearer client-key"), ("upstream-key", "Bearer upstream-key")]
)
def test_proxy_auth_and_upstream_key_rules(
    upstream: tuple[RelayUpstream, str], upstream_key: str | None, sent: str
) -> None:
    scripted, url = upstream
    with running_proxy(url, api_keys=["client-key"], upstream_api_key=upstream_key) as proxy:
        refused = httpx2.get(proxy + "/v1/batches", headers={"authorization": "Bearer wrong"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert scripted.seen == []
        with sdk(proxy, api_key="client-key") as client:
            client.batches.with_raw_response.list()
    assert scripted.seen[0].headers["authorization"] == sent


def test_relayed_requests_are_counted_under_one_route_label(proxy_url: str) -> None:
    for path in ("/v1/a", "/v1/b/c", "/v1/d?e=f"):
        httpx2.get(proxy_url + path)
    metrics = httpx2.get(proxy_url + "/metrics").text
    assert 'fama_requests_total{model="",route="/v1/{path:path}",status="201"} 3.0' in metrics


@pytest.mark.parametrize(
    ("route", "owned_by"), [("ok", "the-model-route"), ("absent", "the-list"), ("405", "the-list")]
)
def test_model_from_its_route_or_the_list_when_the_upstream_has_no_route(route: str, owned_by: str) -> None:
    scripted = RelayUpstream(models_route=route)
    with serve_in_thread(scripted.app) as url, running_proxy(url + "/v1") as proxy, sdk(proxy) as client:
        assert client.models.retrieve("m-1").owned_by == owned_by
        if route != "ok":
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("m-2")  # in neither
    assert scripted.seen[0].raw_path == "/v1/models/m-1"


def test_a_model_the_upstream_does_not_know_is_its_404() -> None:
    scripted = RelayUpstream(models_route="unknown")
    with serve_in_thread(scripted.app) as url, running_proxy(url + "/v1") as proxy, sdk(proxy) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("m-1")  # in the list, but the route says otherwise: the route wins
        assert caught.value.response.json()["error"]["code"] == "model_not_found"
    assert [s.raw_path for s in scripted.seen] == ["/v1/models/m-1"]


def test_a_stalled_request_body_is_408_and_the_upstream_request_is_abandoned(
    upstream: tuple[RelayUpstream, str],
) -> None:
    scripted, url = upstream
    with running_proxy(url, request_read_timeout_s=0.5) as proxy:
        host, port = proxy.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            # Headers promise 200 bytes; 20 arrive, then nothing.
            conn.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\ncontent-length: 200\r\n\r\n" + b"x" * 20)
            answer = b""
            while not answer.rstrip().endswith(b"}"):
                piece = conn.recv(65536)
                if not piece:
                    break
                answer += piece
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert scripted.seen == []
