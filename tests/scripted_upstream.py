"""A scripted model server: replays chat streams the way real OpenAI-compatible servers emit them.

Run it with :func:`tests.servers.serve_in_thread` (``ScriptedUpstream().app``) and point the proxy at
``<url>/v1``. The request's ``model`` chooses the script: ``"<style>:<scenario>"``.

Styles (wire formats as those servers really emit them, quirks included):

- ``openai``   the spec: role and ``refusal`` in the first delta only, tool-call header once, separate
               ``choices: []`` usage chunk, ``logprobs``/``refusal`` null in messages.
- ``vllm``     spec-like; ``chatcmpl-tool-`` ids, ``stop_reason`` extras, empty ``tool_calls`` lists in
               messages, no ``refusal``; errors ``{"object": "error", ..., "code": 400}`` (numeric).
- ``ollama``   role in every delta; all tool calls in one delta, every one on ``index`` 0; tool turns
               finish with ``stop``; no ``logprobs``/``refusal``; flat ``{"error": "..."}`` errors.
- ``llamacpp`` llama.cpp server: tool call ``id``/``type``/``name`` repeated in every delta; usage and
               ``timings`` inside the last chunk that still has choices (whatever ``include_usage``
               says); ``{"error": {"code": 500, ...}}`` bodies; mid-stream ``error: {...}`` lines.
- ``tgi``      TGI Messages API: empty ``id``; role in every delta; ``tool_calls`` as an object with
               ``id: ""`` and the name repeated; ``arguments`` an object in messages; ``eos_token``
               finish reason; no usage chunk; ``{"error": "...", "error_type": "..."}`` bodies; one
               tool call per turn.

Scenarios: ``text``, ``tool`` (one call), ``tools`` (two calls; not ``tgi``), ``error-<status>`` (the
style's error body; 429 carries ``retry-after``, 7 s by default), ``midstream-error``, ``drop`` (connection cut
mid-stream), ``bad-json``, ``slow`` (long stream with delays; notes cancellation), ``large`` (``large_chunks`` chunks
of 1 KiB content as fast as the reader takes them; counted in ``produced``), ``hang`` (sleeps
before answering).

Every request is recorded in :attr:`ScriptedUpstream.requests` (path, headers, parsed body);
:attr:`ScriptedUpstream.cancelled` is set when a client abandons a stream before its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TEXT = ["Hello", ",", " world", "!"]
CONTENT = "".join(TEXT)
USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
CREATED = 1_760_000_000


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str
    pieces: tuple[str, ...]


CALLS = (
    Call("call_w1", "get_weather", '{"city":"Paris"}', ('{"ci', 'ty":', '"Par', 'is"}')),
    Call("call_t2", "get_time", '{"tz":"Europe/Paris"}', ('{"tz"', ':"Europe', '/Paris"}')),
)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any
    peer: str  # the client's address: one per upstream connection
    at: float = field(default_factory=time.monotonic)


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Script:
    """The chunks and bodies of one style."""

    style = "openai"
    id = "chatcmpl-openai-1"
    model = "gpt-test"

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "fp_test",
            "choices": choices,
            **extra,
        }

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> dict[str, Any]:
        extra = {"usage": None} if usage else {}
        return self.envelope([self.choice(delta, finish)], **extra)

    def text_stream(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": "", "refusal": None}, usage=include_usage)
        for piece in TEXT:
            yield self.chunk({"content": piece}, usage=include_usage)
        yield self.chunk({}, "stop", usage=include_usage)
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def tool_stream(self, calls: tuple[Call, ...], include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": None, "refusal": None}, usage=include_usage)
        for i, call in enumerate(calls):
            header = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            yield self.chunk({"tool_calls": [header]}, usage=include_usage)
            for piece in call.pieces:
                yield self.chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}, usage=include_usage)
        yield self.chunk({}, "tool_calls", usage=include_usage)
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def message(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        if calls:
            tool_calls = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
            return {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": tool_calls}
        return {"role": "assistant", "content": CONTENT, "refusal": None, "annotations": []}

    def completion(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "fp_test",
            "choices": [
                {
                    "index": 0,
                    "message": self.message(calls),
                    "logprobs": None,
                    "finish_reason": "tool_calls" if calls else "stop",
                }
            ],
            "usage": USAGE,
        }

    def error(self, status: int, message: str) -> dict[str, Any]:
        code = {429: "rate_limit_exceeded", 401: "invalid_api_key", 404: "model_not_found"}.get(status)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def stream_error(self, message: str) -> bytes:
        return _sse(self.error(500, message))

    def models(self) -> object:
        return {
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": CREATED, "owned_by": "org"}],
        }


class VllmScript(Script):
    style = "vllm"
    id = "chatcmpl-vllm-1"
    model = "Qwen/Qwen2.5-7B-Instruct"

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}

    def text_stream(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": ""})
        for piece in TEXT:
            yield self.chunk({"content": piece})
        yield self.chunk({"content": ""}, "stop")
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def tool_stream(self, calls: tuple[Call, ...], include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": ""})
        for i, call in enumerate(calls):
            header = {
                "id": f"chatcmpl-tool-{call.id}",
                "type": "function",
                "index": i,
                "function": {"name": call.name},
            }
            yield self.chunk({"tool_calls": [header]})
            for piece in call.pieces:
                yield self.chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield self.chunk({"content": ""}, "tool_calls")
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def message(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        tool_calls = [
            {"id": f"chatcmpl-tool-{c.id}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
        content = None if calls else CONTENT
        return {"role": "assistant", "reasoning_content": None, "content": content, "tool_calls": tool_calls}

    def completion(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        body = super().completion(calls)
        body["choices"][0]["stop_reason"] = None
        body["prompt_logprobs"] = None
        return body

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
        return {"object": "error", "message": message, "type": kind, "param": None, "code": status}

    def stream_error(self, message: str) -> bytes:
        return _sse({"error": self.error(500, message)})


class OllamaScript(Script):
    style = "ollama"
    id = "chatcmpl-456"
    model = "llama3.2"

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": finish}

    def text_stream(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        for piece in TEXT:
            yield self.chunk({"content": piece})
        yield self.chunk({"content": ""}, "stop")
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def tool_stream(self, calls: tuple[Call, ...], include_usage: bool) -> Iterator[dict[str, Any]]:
        tool_calls = [
            {"id": c.id, "index": 0, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
        yield self.chunk({"content": "", "tool_calls": tool_calls})
        yield self.chunk({"content": ""}, "stop")
        if include_usage:
            yield self.envelope([], usage=USAGE)

    def message(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        if calls:
            tool_calls = [
                {"id": c.id, "index": 0, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
            return {"role": "assistant", "content": "", "tool_calls": tool_calls}
        return {"role": "assistant", "content": CONTENT}

    def completion(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": self.message(calls), "finish_reason": "stop"}],
            "usage": USAGE,
        }

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"error": message}

    def models(self) -> object:
        return {
            "object": "list",
            "data": [{"id": f"{self.model}:latest", "object": "model", "created": CREATED, "owned_by": "library"}],
        }


class LlamaCppScript(Script):
    style = "llamacpp"
    id = "chatcmpl-lcpp"
    model = "gpt-3.5-turbo"
    timings: ClassVar[dict[str, float]] = {"prompt_n": 12, "prompt_ms": 10.5, "predicted_n": 4, "predicted_ms": 30.1}

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"finish_reason": finish, "index": 0, "delta": delta}

    def last(self, finish: str) -> dict[str, Any]:
        return self.envelope([self.choice({}, finish)], usage=USAGE, timings=self.timings)

    def text_stream(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": None})
        for piece in TEXT:
            yield self.chunk({"content": piece})
        yield self.last("stop")

    def tool_stream(self, calls: tuple[Call, ...], include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": None})
        for i, call in enumerate(calls):
            for piece in call.pieces:
                delta = {
                    "index": i,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": piece},
                }
                yield self.chunk({"tool_calls": [delta]})
        yield self.last("tool_calls")

    def message(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        if calls:
            tool_calls = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}, "id": c.id} for c in calls
            ]
            return {"role": "assistant", "content": None, "tool_calls": tool_calls}
        return {"role": "assistant", "content": CONTENT}

    def completion(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        return {
            "choices": [
                {"finish_reason": "tool_calls" if calls else "stop", "index": 0, "message": self.message(calls)}
            ],
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "b4500-adfa1",
            "object": "chat.completion",
            "usage": USAGE,
            "id": self.id,
            "timings": self.timings,
        }

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"code": status, "message": message, "type": kind}}

    def stream_error(self, message: str) -> bytes:
        return b"error: " + json.dumps({"code": 500, "message": message, "type": "server_error"}).encode() + b"\n\n"

    def models(self) -> object:
        model = {"id": "smollm2.gguf", "object": "model", "created": CREATED, "owned_by": "llamacpp", "meta": {}}
        return {"object": "list", "data": [model]}


class TgiScript(Script):
    style = "tgi"
    id = ""
    model = "tgi"

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": {"role": "assistant", **delta}, "logprobs": None, "finish_reason": finish}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> dict[str, Any]:
        return self.envelope([self.choice(delta, finish)], usage=None)

    def text_stream(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        for i, piece in enumerate(TEXT):
            yield self.chunk({"content": piece}, "eos_token" if i == len(TEXT) - 1 else None)

    def tool_stream(self, calls: tuple[Call, ...], include_usage: bool) -> Iterator[dict[str, Any]]:
        (call,) = calls
        for piece in call.pieces:
            function = {"description": None, "name": call.name, "arguments": piece}
            yield self.chunk({"tool_calls": {"index": 0, "id": "", "type": "function", "function": function}})
        yield self.chunk({"content": None}, "eos_token")

    def message(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        if calls:
            tool_calls = [
                {
                    "id": str(i),
                    "type": "function",
                    "function": {"description": None, "name": c.name, "arguments": json.loads(c.arguments)},
                }
                for i, c in enumerate(calls)
            ]
            return {"role": "assistant", "content": None, "tool_calls": tool_calls}
        return {"role": "assistant", "content": CONTENT}

    def completion(self, calls: tuple[Call, ...]) -> dict[str, Any]:
        return {
            "object": "chat.completion",
            "id": "",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "2.4.0-native",
            "choices": [{"index": 0, "message": self.message(calls), "logprobs": None, "finish_reason": "eos_token"}],
            "usage": USAGE,
        }

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind = {400: "validation", 422: "validation", 429: "overloaded"}.get(status, "generation")
        return {"error": message, "error_type": kind}

    def stream_error(self, message: str) -> bytes:
        return _sse({"error": message, "error_type": "generation"})

    def models(self) -> object:
        return {"id": "tgi-model", "object": "model", "created": CREATED, "owned_by": "tgi-model"}


SCRIPTS: dict[str, Script] = {
    s.style: s for s in (Script(), VllmScript(), OllamaScript(), LlamaCppScript(), TgiScript())
}
STYLES = tuple(SCRIPTS)


class ScriptedUpstream:
    def __init__(
        self,
        models_style: str = "openai",
        chunk_delay_s: float = 0.0,
        slow_delay_s: float = 0.05,
        retry_after: str = "7",
        large_chunks: int = 50_000,
    ) -> None:
        self.large_chunks = large_chunks
        self.produced = 0  # chunks the "large" scenario has handed to the server so far
        self.models_style = models_style
        self.retry_after = retry_after
        self.chunk_delay_s = chunk_delay_s
        self.slow_delay_s = slow_delay_s
        self.requests: list[Recorded] = []
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            ]
        )

    @property
    def last(self) -> Recorded:
        with self._lock:
            return self.requests[-1]

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        with self._lock:
            peer = f"{request.client.host}:{request.client.port}" if request.client else ""
            self.requests.append(Recorded(request.url.path, dict(request.headers), body, peer))
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        style, _, scenario = str(body.get("model", "openai:text")).partition(":")
        script = SCRIPTS[style]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if scenario.startswith("error-"):
            status = int(scenario.removeprefix("error-"))
            headers = {"retry-after": self.retry_after} if status == 429 else {}
            return JSONResponse(script.error(status, f"scripted {status} from {style}"), status, headers=headers)
        if scenario == "hang":
            await self._hang(request)
        calls = {"tool": CALLS[:1], "tools": CALLS}.get(scenario, ())
        if not body.get("stream"):
            return JSONResponse(script.completion(calls))
        chunks = list(script.tool_stream(calls, include_usage) if calls else script.text_stream(include_usage))
        return StreamingResponse(self._stream(script, scenario, chunks), media_type="text/event-stream")

    async def _hang(self, request: Request) -> None:
        """Answer nothing for 5 s; note it when the caller gives up first (closes the connection)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                self._note_cancel()

    def _note_cancel(self) -> None:
        self.cancelled_at = time.monotonic()
        self.cancelled.set()

    async def _stream(self, script: Script, scenario: str, chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        finished = False
        try:
            if scenario == "empty-stream":  # llama-cpp-python when generation fails before the first chunk
                finished = True
                return
            if scenario == "slow":
                for i in range(400):
                    await asyncio.sleep(self.slow_delay_s)
                    yield _sse(script.chunk({"content": f"{i} "}))
            if scenario == "large":
                piece = "x" * 1024
                for _ in range(self.large_chunks):
                    self.produced += 1
                    yield _sse(script.chunk({"content": piece}))
            for i, chunk in enumerate(chunks):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                if i == 2 and scenario == "midstream-error":
                    yield script.stream_error("scripted failure during generation")
                    finished = True
                    return
                if i == 2 and scenario == "drop":
                    raise ConnectionAbortedError("scripted connection drop")
                if i == 2 and scenario == "bad-json":
                    yield b'data: {"choices": [{"delta": \n\n'
                yield _sse(chunk)
            yield DONE
            finished = True
        finally:
            if not finished and scenario != "drop":
                self._note_cancel()

    async def completions(self, request: Request) -> Response:
        body = await self._record(request)
        choice = {"index": 0, "text": CONTENT, "logprobs": None, "finish_reason": "stop"}
        base = {"id": "cmpl-1", "object": "text_completion", "created": CREATED, "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse({**base, "choices": [choice], "usage": USAGE})

        async def stream() -> AsyncIterator[bytes]:
            for piece in TEXT:
                yield _sse({**base, "choices": [{**choice, "text": piece, "finish_reason": None}]})
            yield _sse({**base, "choices": [{**choice, "text": "", "finish_reason": "stop"}]})
            yield DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(i)]} for i in range(len(inputs))]
        usage = {"prompt_tokens": 3, "total_tokens": 3}
        return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def list_models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse(SCRIPTS[self.models_style].models())

    async def get_model(self, request: Request) -> Response:
        await self._record(request)
        script = SCRIPTS[self.models_style]
        if script.style in ("llamacpp", "tgi"):  # neither server has this route
            return Response("Not Found", 404, media_type="text/plain")
        listed = script.models()
        assert isinstance(listed, dict)
        for entry in listed["data"]:
            if entry["id"] == request.path_params["model_id"]:
                return JSONResponse(entry)
        return JSONResponse(script.error(404, "model not found"), 404)
