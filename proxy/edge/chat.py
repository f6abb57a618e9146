"""The ``/v1/chat/completions`` flow, as a pipeline of small steps.

::

    parse_request(raw)                    400 naming the param; unknown fields kept untouched
      -> hooks.before_upstream(ctx, body) SEAM: may rewrite the request (e.g. inject a system message)
      -> adapt_for_upstream(body)         request-side quirks every upstream accepts
      -> upstream call
           non-streaming: ctx.complete(body) -> normalized response dict (tool calls written as text
                          moved to tool_calls, :mod:`proxy.upstream.textcalls`)
                          -> hooks.after_response(ctx, response)   SEAM: may replace it or retry
           streaming:     ctx.open_stream(body) -> iterator of normalized chunk dicts
                          -> hooks.stream(ctx, chunks)              SEAM: may hold/replace deltas or retry
      -> client (JSON body, or the SSE relay in :mod:`proxy.edge.relay`)

The seam (:class:`~proxy.hooks.ChatContext`, :class:`~proxy.hooks.ChatHooks`) lives in :mod:`proxy.hooks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response

from proxy.edge.inbound import json_object, require
from proxy.edge.relay import EventStream, relay
from proxy.errors import InvalidRequest
from proxy.hooks import ChatContext, ChatHooks
from proxy.upstream import normalize
from proxy.upstream.chunks import NormalizedChunks


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


async def respond(ctx: ChatContext, hooks: ChatHooks, ping_s: float, shutdown_grace_s: float = 0.0) -> Response:
    body = normalize.adapt_for_upstream(await hooks.before_upstream(ctx, ctx.body))
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
