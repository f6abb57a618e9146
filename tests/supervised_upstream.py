"""A scripted model for supervision tests: its answer depends on the conversation it is sent.

``ScriptedModel(reply)`` serves ``/v1/chat/completions`` on a real uvicorn (``serve_in_thread(model.app)``).
``reply(body)`` returns the assistant message to give (``content`` and/or ``tool_calls``); it is sent as
an OpenAI-style completion, or streamed the way OpenAI streams it: role first, content in pieces,
then each tool call's header and its arguments in pieces, a ``finish_reason`` chunk, and usage when
asked for. A reply ``{"fault": "500" | "429" | "hang" | "drop"}`` answers with that fault instead
(:meth:`ScriptedModel._fault`). ``gap_s`` is a pause between content and tool calls, so that a test can tell what reached
the client when. Every request body is kept in :attr:`ScriptedModel.requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Reply = Callable[[dict[str, Any]], dict[str, Any]]
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def feedback_in(body: dict[str, Any], role: str = "system") -> str | None:
    """The proxy's corrective feedback, when this request is a retry (a ``user`` message for a harness that feeds
    everything back as the user's turns)."""
    last = body["messages"][-1]
    content = last.get("content")
    if last.get("role") == role and isinstance(content, str) and content.startswith("[FAMA feedback]"):
        return content
    return None


def context_in(body: dict[str, Any]) -> str | None:
    """The injected context message, if any."""
    for m in body["messages"]:
        content = m.get("content")
        if m.get("role") == "system" and isinstance(content, str) and content.startswith("[FAMA context v1]"):
            return content
    return None


def call(name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class ScriptedModel:
    def __init__(self, reply: Reply, gap_s: float = 0.0) -> None:
        self.reply = reply
        self.gap_s = gap_s
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._count = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)

    async def chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        with self._lock:
            self.requests.append(body)
            self._count += 1
            completion_id = f"chatcmpl-scripted-{self._count}"
        reply = self.reply(body)
        if "fault" in reply:
            return await self._fault(request, str(reply["fault"]), bool(body.get("stream")))
        message = {"role": "assistant", "content": None, **reply}
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": 1_760_000_000,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": USAGE,
                }
            )
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(self._stream(completion_id, body["model"], message, finish, usage))

    async def _fault(self, request: Request, fault: str, stream: bool) -> Response:
        """``500`` / ``429`` (``retry-after: 1``): an error answer; ``hang``: no answer for 5 s (ended early
        when the caller leaves); ``drop``: the connection is cut after the first bytes of the answer."""
        if fault in ("500", "429"):
            status = int(fault)
            error = {"message": f"scripted {status}", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status, headers={"retry-after": "1"} if status == 429 else None)
        if fault == "hang":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
            return Response(status_code=204)
        assert fault == "drop", fault

        async def cut() -> AsyncIterator[bytes]:
            yield b'data: {"id": "chatcmpl-cut", "object": "chat.completion.chunk", "choices": [' if stream else b"{"
            raise ConnectionAbortedError("scripted connection drop")

        return StreamingResponse(cut(), media_type="text/event-stream" if stream else "application/json")

    async def _stream(
        self, completion_id: str, model: str, message: dict[str, Any], finish: str, usage: bool
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": 1_760_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        if message.get("content"):
            for piece in _pieces(str(message["content"]), 8):
                yield chunk({"content": piece})
        if self.gap_s:
            await asyncio.sleep(self.gap_s)
        for i, tc in enumerate(message.get("tool_calls") or ()):
            header = {"index": i, "id": tc["id"], "type": "function", "function": {"name": tc["function"]["name"]}}
            yield chunk({"tool_calls": [header]})
            for piece in _pieces(tc["function"]["arguments"], 5):
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield chunk({}, finish)
        if usage:
            tail = {"id": completion_id, "object": "chat.completion.chunk", "created": 1, "model": model}
            yield b"data: " + json.dumps({**tail, "choices": [], "usage": USAGE}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
