"""The native path: the upstream serves ``/v1/responses`` itself.

A turn without function tools, outside a chain the proxy answered, is forwarded as is (see
:mod:`proxy.edge.responses`). A turn with function tools is supervised like chat: :class:`NativeContext` is the chat
pipeline's context whose upstream calls go to the upstream's ``/responses`` with the client's own parameters and,
as input, the conversation the hooks send (context message and corrective feedback included). The upstream's
Response is read back as a chat completion for the hooks, and its stream events as chat chunks. The answer the
client gets is the supervised one, under the proxy's id, stored by the proxy like a bridged one: what the upstream
stored may be an attempt the client never saw.

Which path serves an upstream (:class:`ResponsesPath`): ``FAMA_UPSTREAM_RESPONSES=native|bridge``, or ``auto``:
one probe per process, a ``POST /responses`` with an empty body; a 404, 405 or 501 means the upstream does not
serve the route (bridge), a success or another client error that it does (native).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from proxy.errors import UpstreamError, UpstreamStreamError
from proxy.hooks import ChatContext
from proxy.tracing import Trace
from proxy.upstream.chunks import stream_error, upstream_frames
from proxy.upstream.client import Upstream

log = logging.getLogger(__name__)

PATH = "/responses"
Path = Literal["native", "bridge"]


class ResponsesPath:
    """Which path ``/v1/responses`` takes for this upstream; ``auto`` asks the upstream once."""

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self._known: Path | None = None if setting == "auto" else ("native" if setting == "native" else "bridge")
        self._lock = asyncio.Lock()

    async def of(self, upstream: Upstream, headers: dict[str, str], trace: Trace) -> Path:
        if self._known is not None:
            return self._known
        async with self._lock:
            if self._known is None:
                self._known = await _probe(upstream, headers, trace)
                log.info("upstream %s: /v1/responses takes the %s path", upstream.base_url, self._known)
        return self._known


async def _probe(upstream: Upstream, headers: dict[str, str], trace: Trace) -> Path:
    """An answer about the route decides; one about the caller or the server's state (401, 403, 429, 5xx, no
    connection) is raised to the client and the next request asks again."""
    try:
        payload = await upstream.request_json("POST", PATH, headers, trace, b"{}")
    except UpstreamError as exc:
        if exc.status in (404, 405, 501):
            return "bridge"
        if exc.status in (401, 403, 429) or exc.status >= 500:
            raise
        return "native"  # e.g. 400 or 422: the route exists and refused the empty request
    return "native" if isinstance(payload, dict) else "bridge"


def input_from_chat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as Responses input items (the inverse of :func:`proxy.responses.translate.chat_messages`)."""
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content")
        if role == "tool":
            items.append(
                {"type": "function_call_output", "call_id": str(m.get("tool_call_id")), "output": content or ""}
            )
            continue
        if content:
            items.append({"type": "message", "role": role, "content": content})
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id"),
                    "name": fn.get("name"),
                    "arguments": fn.get("arguments"),
                }
            )
    return items


def chat_completion(response: dict[str, Any]) -> dict[str, Any]:
    """A native Response, read as the chat completion the hooks judge."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text += [str(p.get("text") or "") for p in item.get("content") or () if p.get("type") == "output_text"]
        elif item.get("type") == "function_call":
            function = {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "")}
            calls.append({"id": str(item.get("call_id") or item.get("id")), "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else ("length" if response.get("status") == "incomplete" else "stop")
    return {
        "id": str(response.get("id") or ""),
        "object": "chat.completion",
        "created": int(response.get("created_at") or time.time()),
        "model": str(response.get("model") or ""),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": chat_usage(response.get("usage")),
    }


def chat_usage(value: object) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = int(value.get("input_tokens") or 0), int(value.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(value.get("total_tokens") or prompt + completion),
    }


@dataclass
class NativeContext(ChatContext[Any]):
    """A chat turn whose model calls go to the upstream's ``/responses``."""

    request: dict[str, Any] = field(default_factory=dict)  # the client's Responses request
    answers: list[dict[str, Any]] = field(default_factory=list)  # every Response the upstream gave, in order

    chained: bool = False  # the previous_response_id chain is the proxy's: its conversation is in ``body``

    def native_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        """The client's request with the whole conversation the hooks send (instructions, the chain, the input,
        their context message and feedback) as its input."""
        native = {k: v for k, v in self.request.items() if k != "instructions"}
        if self.chained:
            native.pop("previous_response_id", None)
        return {**native, "input": input_from_chat(body["messages"]), "stream": stream}

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        content = orjson.dumps(self.native_body(body, stream=False))
        payload = await self.upstream.request_json("POST", PATH, self.upstream_headers, self.trace, content)
        if not isinstance(payload, dict):
            raise UpstreamStreamError("the upstream model server answered with something other than a JSON object")
        self.answers.append(payload)
        return chat_completion(payload)

    async def open_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        content = orjson.dumps(self.native_body(body, stream=True))
        reply = await self.upstream.open("POST", PATH, self.upstream_headers, self.trace, content)
        self._open.append(reply)
        return self._chunks(upstream_frames(reply))

    async def _chunks(self, frames: AsyncIterator[tuple[object, bytes]]) -> AsyncIterator[dict[str, Any]]:
        """The upstream's Responses events as chat chunks: text deltas, one tool call per function call item,
        a finish chunk and usage."""
        envelope: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": 0, "model": self.model}
        calls = 0

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**envelope, "choices": [choice]}

        yield chunk({"role": "assistant", "content": ""})
        async for payload, _ in frames:
            if not isinstance(payload, dict):
                continue
            kind = payload.get("type")
            if kind in ("response.created", "response.in_progress"):
                response = payload.get("response") or {}
                envelope["id"] = str(response.get("id") or "")
                envelope["created"] = int(response.get("created_at") or 0)
            elif kind == "response.output_text.delta":
                yield chunk({"content": str(payload.get("delta") or "")})
            elif kind == "response.output_item.added" and (payload.get("item") or {}).get("type") == "function_call":
                item = payload["item"]
                header = {"index": calls, "id": str(item.get("call_id") or item.get("id")), "type": "function"}
                header["function"] = {
                    "name": str(item.get("name") or ""),
                    "arguments": str(item.get("arguments") or ""),
                }
                calls += 1
                yield chunk({"tool_calls": [header]})
            elif kind == "response.function_call_arguments.delta" and calls:
                yield chunk({"tool_calls": [{"index": calls - 1, "function": {"arguments": str(payload["delta"])}}]})
            elif kind in ("response.completed", "response.incomplete"):
                response = payload.get("response") or {}
                self.answers.append(response)
                finish = "tool_calls" if calls else ("length" if kind == "response.incomplete" else "stop")
                yield chunk({}, finish)
                yield {**envelope, "choices": [], "usage": chat_usage(response.get("usage"))}
            elif kind in ("error", "response.failed"):
                error = payload.get("error") or (payload.get("response") or {}).get("error") or payload
                raise stream_error({"error": error})
