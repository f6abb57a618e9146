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

from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response

from proxy.edge.inbound import expect, json_object, require
from proxy.edge.relay import EventStream, relay
from proxy.errors import InvalidRequest
from proxy.hooks import ChatContext, ChatHooks, S
from proxy.upstream import normalize
from proxy.upstream.chunks import NormalizedChunks


def _check_message(message: Any, i: int) -> None:
    """The message fields the proxy itself reads have the types the OpenAI API gives them."""
    p = f"messages[{i}]"
    m = expect(message, (dict,), "an object", p)
    expect(m.get("role"), (str,), "a string", f"{p}.role")
    require(m, "content", (str, list), "a string or an array of content parts", True, f"{p}.content")
    require(m, "tool_call_id", (str,), "a string", True, f"{p}.tool_call_id")
    calls = require(m, "tool_calls", (list,), "an array of tool calls", True, f"{p}.tool_calls")
    for j, call in enumerate(calls or ()):
        q = f"{p}.tool_calls[{j}]"
        c = expect(call, (dict,), "an object", q)
        require(c, "id", (str,), "a string", True, f"{q}.id")
        fn = expect(c.get("function"), (dict,), "an object with the function's name and arguments", f"{q}.function")
        require(fn, "name", (str,), "a string", True, f"{q}.function.name")
        require(fn, "arguments", (str, dict), "a string of JSON", True, f"{q}.function.arguments")


def _check_tool(tool: Any, i: int) -> None:
    p = f"tools[{i}]"
    t = expect(tool, (dict,), "an object", p)
    # other tool types (no ``function``) pass through to the model server as they are
    fn = require(t, "function", (dict,), "an object", True, f"{p}.function")
    if fn is None:
        return
    require(fn, "name", (str,), "a string", True, f"{p}.function.name")
    require(fn, "description", (str,), "a string", True, f"{p}.function.description")
    require(fn, "parameters", (dict,), "an object (a JSON Schema)", True, f"{p}.function.parameters")


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


async def respond(ctx: ChatContext[S], hooks: ChatHooks[S], ping_s: float, shutdown_grace_s: float = 0.0) -> Response:
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
