"""The ``/v1/chat/completions`` flow, as a pipeline of small steps.

::

    parse_request(raw)                    400 naming the param; unknown fields kept untouched
      -> hooks.before_upstream(ctx, body) SEAM: may rewrite the request (e.g. inject a system message)
      -> adapt_for_upstream(body)         request-side quirks every upstream accepts
      -> upstream call
           non-streaming: ctx.complete(body) -> normalized response dict (tool calls written as text
                          moved to tool_calls, :mod:`proxy.textcalls`)
                          -> hooks.after_response(ctx, response)   SEAM: may replace it or retry
           streaming:     ctx.open_stream(body) -> iterator of normalized chunk dicts
                          -> hooks.stream(ctx, chunks)              SEAM: may hold/replace deltas or retry
      -> client (JSON body, or the SSE relay in :mod:`proxy.streaming`)

Supervision plugs in by passing a :class:`ChatHooks` subclass to ``create_app``. A hook that retries
calls ``ctx.complete(new_body)`` / ``ctx.open_stream(new_body)`` again: every upstream response the
context opened is closed when the turn ends (``ctx.aclose``), also on client disconnect. Hooks see
normalized, spec-valid dicts only; upstream errors reach them as :class:`~proxy.errors.ProxyError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response

from proxy import normalize, textcalls
from proxy.errors import InvalidRequest, UpstreamStreamError
from proxy.inbound import json_object, require
from proxy.metrics import ProxyMetrics
from proxy.streaming import EventStream, NormalizedChunks, ToolTextChunks, relay, upstream_frames
from proxy.tracing import Trace
from proxy.upstream import Response as UpstreamResponse
from proxy.upstream import Upstream, close

PATH = "/chat/completions"
REPAIRED_HEADER = "x-fama-repaired"  # non-streaming answers whose tool calls the model wrote as text
logger = logging.getLogger("fama.proxy.chat")


def _typed(obj: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str, param: str) -> None:
    """400 naming ``param`` when ``obj[key]`` is present, not null and not of one of ``kinds``."""
    value = obj.get(key)
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise InvalidRequest(f"'{param}' must be {what}", param=param, code="invalid_type")


def _object(value: Any, what: str, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be {what}", param=param, code="invalid_type")
    return value


def _check_message(message: Any, i: int) -> None:
    """The message fields the proxy itself reads have the types the OpenAI API gives them."""
    p = f"messages[{i}]"
    m = _object(message, "an object", p)
    if not isinstance(m.get("role"), str):
        raise InvalidRequest(f"'{p}.role' must be a string", param=f"{p}.role", code="invalid_type")
    _typed(m, "content", (str, list), "a string or an array of content parts", f"{p}.content")
    _typed(m, "tool_call_id", (str,), "a string", f"{p}.tool_call_id")
    calls = m.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise InvalidRequest(
            f"'{p}.tool_calls' must be an array of tool calls", param=f"{p}.tool_calls", code="invalid_type"
        )
    for j, call in enumerate(calls):
        q = f"{p}.tool_calls[{j}]"
        c = _object(call, "an object", q)
        _typed(c, "id", (str,), "a string", f"{q}.id")
        fn = _object(c.get("function"), "an object with the function's name and arguments", f"{q}.function")
        _typed(fn, "name", (str,), "a string", f"{q}.function.name")
        _typed(fn, "arguments", (str, dict), "a string of JSON", f"{q}.function.arguments")


def _check_tool(tool: Any, i: int) -> None:
    p = f"tools[{i}]"
    t = _object(tool, "an object", p)
    if t.get("function") is None:
        return  # other tool types pass through to the model server as they are
    fn = _object(t["function"], "an object", f"{p}.function")
    _typed(fn, "name", (str,), "a string", f"{p}.function.name")
    _typed(fn, "description", (str,), "a string", f"{p}.function.description")
    _typed(fn, "parameters", (dict,), "an object (a JSON Schema)", f"{p}.function.parameters")


def parse_request(raw: bytes) -> dict[str, Any]:
    body = json_object(raw)
    require(body, "model", (str,), "a string")
    require(body, "messages", (list,), "an array of messages")
    messages: list[Any] = body["messages"]
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages", code="empty_array")
    for i, message in enumerate(messages):
        _check_message(message, i)
    require(body, "stream", (bool,), "a boolean", optional=True)
    require(body, "stream_options", (dict,), "an object", optional=True)
    require(body, "tools", (list,), "an array of tools", optional=True)
    for i, tool in enumerate(body.get("tools") or []):
        _check_tool(tool, i)
    require(body, "tool_choice", (str, dict), "a string or an object", optional=True)
    require(body, "response_format", (dict,), "an object", optional=True)
    require(body, "n", (int,), "an integer", optional=True)
    return body


def adapt_for_upstream(body: dict[str, Any]) -> dict[str, Any]:
    """Request-side quirks. llama-cpp-python answers 500 to an assistant message whose ``content`` is
    null next to ``tool_calls``; an empty string means the same to every server."""
    for message in body["messages"]:
        if message.get("role") == "assistant" and message.get("tool_calls") and message.get("content") is None:
            message["content"] = ""
    # llama-cpp-python ignores max_completion_tokens (the newer name) and generates until the context is full.
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body["max_tokens"] = body["max_completion_tokens"]
    return body


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


@dataclass
class ChatContext:
    """One chat turn: who asked, how to reach the upstream, and every upstream response it opened."""

    body: dict[str, Any]
    tenant: str
    trace: Trace
    upstream: Upstream
    metrics: ProxyMetrics
    upstream_headers: dict[str, str]
    _open: list[tuple[UpstreamResponse, float]] = field(default_factory=list)
    request_headers: Mapping[str, str] = field(default_factory=dict)  # the client's (e.g. x-fama-session)
    response_headers: dict[str, str] = field(default_factory=dict)  # hooks add theirs; sent with the response
    hook_state: dict[str, Any] = field(default_factory=dict)  # a hook's per-turn state, from request to answer

    @property
    def model(self) -> str:
        model: str = self.body["model"]
        return model

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        payload, _ = await self.upstream.request_json(
            "POST", PATH, self.upstream_headers, self.trace, orjson.dumps(body)
        )
        if not isinstance(payload, dict):
            raise UpstreamStreamError("the upstream model server answered with something other than a JSON object")
        response = normalize.chat_completion(payload, self.model)
        tools = textcalls.declared_tools(body)
        if tools:
            for choice in response.get("choices") or []:
                if isinstance(choice.get("message"), dict) and textcalls.repair_message(choice["message"], tools):
                    choice["finish_reason"] = "tool_calls"
                    self.metrics.text_tool_calls.labels(stream="false").inc()
                    self.response_headers[REPAIRED_HEADER] = "text-tool-calls"
                    logger.info("tool calls written as text sent as tool_calls (request %s)", self.trace.request_id)
        return response

    async def open_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Open a streamed completion; upstream error statuses raise here, before any byte is sent."""
        started = time.perf_counter()
        response = await self.upstream.open("POST", PATH, self.upstream_headers, self.trace, orjson.dumps(body))
        self._open.append((response, started))
        normalizer = normalize.ChunkNormalizer(self.model, wants_usage(body))
        tools = textcalls.declared_tools(body)
        if tools:
            return ToolTextChunks(upstream_frames(response), normalizer, tools, self._count_stream_repair)
        return NormalizedChunks(upstream_frames(response), normalizer)

    def _count_stream_repair(self) -> None:
        # The stream's headers left before the reply was read: the metric and the log say it instead.
        self.metrics.text_tool_calls.labels(stream="true").inc()
        logger.info("streamed tool calls written as text sent as tool_calls (request %s)", self.trace.request_id)

    async def aclose(self) -> None:
        while self._open:
            response, started = self._open.pop()
            close(response)
            self.trace.upstream_s += time.perf_counter() - started


class ChatHooks:
    """The supervision seam. The defaults pass everything through unchanged."""

    async def start(self) -> None:
        """Open the hooks' resources; called from the app's lifespan."""

    async def stop(self) -> None:
        """Close them; called from the app's lifespan."""

    async def before_upstream(self, ctx: ChatContext, body: dict[str, Any]) -> dict[str, Any]:
        return body

    async def after_response(self, ctx: ChatContext, response: dict[str, Any]) -> dict[str, Any]:
        return response

    def stream(self, ctx: ChatContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        return chunks


async def respond(ctx: ChatContext, hooks: ChatHooks, ping_s: float, shutdown_grace_s: float = 0.0) -> Response:
    body = adapt_for_upstream(await hooks.before_upstream(ctx, ctx.body))
    if body.get("stream"):
        try:
            opened = await ctx.open_stream(body)
            chunks = hooks.stream(ctx, opened)
        except BaseException:
            await ctx.aclose()
            raise
        # A hook that passes the stream through leaves every chunk as the normalizer made it.
        unmodified = opened if chunks is opened and isinstance(opened, NormalizedChunks) else None
        return EventStream(
            relay(chunks, ctx.trace, ctx.metrics, ctx.aclose, unmodified),
            headers=ctx.response_headers,
            ping=ping_s,
            shutdown_grace_period=shutdown_grace_s,  # on server shutdown: time to finish before the cut
            background=BackgroundTask(ctx.aclose),  # also when the client left before the first event
        )
    try:
        response = await hooks.after_response(ctx, await ctx.complete(body))
    finally:
        await ctx.aclose()
    return Response(orjson.dumps(response), media_type="application/json", headers=ctx.response_headers)
