"""The Responses API routes: ``POST /v1/responses``, ``GET|DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``, ``GET /v1/responses/{id}/input_items``.

A create takes the bridged or the native path (:mod:`proxy.responses.native`); either way a turn with function
tools runs through the chat pipeline and its hooks (:mod:`proxy.responses.turn`). Reads answer from the proxy's
store (:mod:`proxy.responses.store`); on the native path what the proxy did not store is forwarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import anyio
import orjson
from fastapi import APIRouter
from sse_starlette import ServerSentEvent
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.edge.deps import require_tenant, state_of, trace_of
from proxy.edge.inbound import cancel_on_disconnect, json_object, read_body, require
from proxy.edge.relay import EventStream
from proxy.errors import InvalidRequest, ProxyError, RouteNotFound, UpstreamStreamError
from proxy.hooks import ChatContext, ChatHooks
from proxy.metrics import ProxyMetrics
from proxy.responses import turn
from proxy.responses.events import EventWriter, replay
from proxy.responses.native import PATH, NativeContext
from proxy.responses.service import Responses
from proxy.responses.store import StoredResponse
from proxy.responses.translate import chat_body, input_items
from proxy.settings import ProxySettings
from proxy.supervision.sessions import SESSION_HEADER
from proxy.tracing import Trace
from proxy.upstream.client import Upstream

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/responses")


class _Request:
    """What a route needs of the app's state, in one place."""

    def __init__(self, request: Request) -> None:
        state = state_of(request)
        self.request = request
        self.settings: ProxySettings = state["settings"]
        self.metrics: ProxyMetrics = state["metrics"]
        self.hooks: ChatHooks[Any] = state["hooks"]
        self.responses: Responses = state["responses"]
        self.upstream: Upstream = state["upstream"]
        self.trace: Trace = trace_of(request)

    def upstream_headers(self) -> dict[str, str]:
        return self.upstream.headers(self.request.headers.get("authorization"), self.trace.request_id)


def parse_request(raw: bytes) -> dict[str, Any]:
    """The fields the proxy reads, type-checked; which are required depends on the path (:func:`_complete`)."""
    body = json_object(raw)
    require(body, "model", (str,), "a string", optional=True)
    require(body, "input", (str, list), "a string or an array of input items", optional=True)
    for name in ("instructions", "previous_response_id"):
        require(body, name, (str,), "a string", optional=True)
    for name in ("stream", "store", "background", "parallel_tool_calls"):
        require(body, name, (bool,), "a boolean", optional=True)
    require(body, "tools", (list,), "an array of tools", optional=True)
    require(body, "tool_choice", (str, dict), "a string or an object", optional=True)
    for name in ("text", "metadata"):
        require(body, name, (dict,), "an object", optional=True)
    require(body, "max_output_tokens", (int,), "an integer", optional=True)
    return body


def _complete(body: dict[str, Any]) -> None:
    """What the proxy needs to run a turn itself (an upstream that serves the API may take less, e.g. a prompt)."""
    require(body, "model", (str,), "a string")
    if body.get("input") is None and body.get("previous_response_id") is None:
        raise InvalidRequest("you must provide the 'input' parameter", param="input", code="missing_required_parameter")


def _supervisable(body: dict[str, Any]) -> bool:
    return any(isinstance(t, dict) and t.get("type") == "function" for t in body.get("tools") or ())


def _not_found(response_id: str) -> RouteNotFound:
    return RouteNotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _json(payload: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


@router.post("")
async def create_response(request: Request) -> Response:
    await require_tenant(request)
    r = _Request(request)
    raw = await read_body(request, r.settings.max_request_bytes, r.settings.request_read_timeout_s)
    body = parse_request(raw)
    r.trace.model = body.get("model") or ""
    return await cancel_on_disconnect(request, lambda: _create(r, body, raw))


async def _create(r: _Request, body: dict[str, Any], raw: bytes) -> Response:
    headers = r.upstream_headers()
    path = await r.responses.path.of(r.upstream, headers, r.trace)
    previous: StoredResponse | None = None
    if body.get("previous_response_id"):
        previous = await r.responses.store.get(r.trace.tenant, body["previous_response_id"])
    if path == "native" and previous is None and not _supervisable(body):
        return await _forward(r, "POST", PATH, raw, stream=bool(body.get("stream")))
    _complete(body)
    if path == "bridge":
        _bridgeable(body, previous)
    items = input_items(body.get("input") or [])
    history = previous.conversation if previous is not None else []
    ctx = _context(r, path, body, previous, chat_body(body, history, items))
    this = turn.ResponsesTurn.of(body, items, history)
    if not body.get("stream"):
        response = await turn.complete(ctx, r.hooks, this, r.responses.store)
        return _json(response, ctx.response_headers)
    events, writer = await turn.open_stream(ctx, r.hooks, this, r.responses.store)
    return EventStream(
        sse(events, writer, r.trace, r.metrics, ctx.aclose),
        headers=ctx.response_headers,
        ping=r.settings.sse_ping_s,
        shutdown_grace_period=r.settings.sse_shutdown_grace_s,
        background=BackgroundTask(ctx.aclose),
    )


def _bridgeable(body: dict[str, Any], previous: StoredResponse | None) -> None:
    """What the bridge cannot serve is a 4xx naming the parameter."""
    if previous is None and body.get("previous_response_id"):
        raise RouteNotFound(
            f"Previous response with id '{body['previous_response_id']}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    for unsupported in ("background", "conversation", "prompt"):
        if body.get(unsupported):
            raise InvalidRequest(
                f"'{unsupported}' needs a model server that serves the Responses API itself; this one speaks "
                "chat completions",
                param=unsupported,
                code="unsupported_parameter",
            )


def _context(
    r: _Request, path: str, body: dict[str, Any], previous: StoredResponse | None, chat: dict[str, Any]
) -> ChatContext[Any]:
    """The chat pipeline's context for this turn: to the upstream's chat completions (bridge) or its own
    ``/responses`` (native); a chain is one supervision session unless the client names one."""
    if not chat["messages"]:
        raise InvalidRequest("'input' must contain at least one item", param="input", code="empty_array")
    request_headers = dict(r.request.headers)
    if previous is not None and previous.session_id and SESSION_HEADER not in request_headers:
        request_headers[SESSION_HEADER] = previous.session_id
    common: dict[str, Any] = {
        "body": chat,
        "tenant": r.trace.tenant,
        "trace": r.trace,
        "upstream": r.upstream,
        "metrics": r.metrics,
        "upstream_headers": r.upstream_headers(),
        "request_headers": request_headers,
        "api": "responses",
    }
    if path == "bridge":
        return ChatContext(**common)
    return NativeContext(**common, request=body, chained=previous is not None)


def _event(event: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(event=event["type"], data=orjson.dumps(event).decode())


async def sse(
    events: AsyncIterator[dict[str, Any]],
    writer: EventWriter,
    trace: Trace,
    metrics: ProxyMetrics,
    close_upstream: Callable[[], Awaitable[None]],
) -> AsyncIterator[ServerSentEvent]:
    """Send Responses events as SSE (``event:`` named as OpenAI does); a failure becomes a final ``error`` event."""
    metrics.active_streams.inc()
    waiting_first = True
    try:
        async for event in events:
            if waiting_first and event["type"] in ("response.output_text.delta", "response.output_item.added"):
                waiting_first = False
                metrics.ttft.labels(metrics.model_label(trace.model)).observe(time.perf_counter() - trace.started)
            yield _event(event)
    except ProxyError as exc:
        if isinstance(exc, UpstreamStreamError):
            metrics.upstream_errors.labels("stream").inc()
        yield _event(writer.error(exc))
    except Exception:  # a bug in the proxy or a hook: the client still gets an error it can act on
        log.exception("responses stream failed inside the proxy (request %s)", trace.request_id)
        yield _event(writer.error(ProxyError("internal error in the proxy; see its log", code="internal_error")))
    finally:
        metrics.active_streams.dec()
        with anyio.CancelScope(shield=True):
            await close_upstream()
            if isinstance(events, AsyncGenerator):
                await events.aclose()


async def _forward(r: _Request, method: str, path: str, content: bytes | None, stream: bool = False) -> Response:
    """The native path for what the proxy neither supervises nor stored: the upstream's answer as it is."""
    query = r.request.url.query
    target = f"{path}?{query}" if query else path
    reply = await r.upstream.open(method, target, r.upstream_headers(), r.trace, content)
    if stream:

        async def body() -> AsyncIterator[bytes]:
            try:
                async for part in reply.parts():
                    yield part
            finally:
                reply.close()

        return StreamingResponse(body(), media_type=reply.content_type, background=BackgroundTask(reply.close))
    try:
        raw = await r.upstream.read(reply)
    finally:
        reply.close()
    return Response(raw, media_type=reply.content_type)


async def _stored_or_forward(
    request: Request, response_id: str, method: str, suffix: str, answer: Callable[[Responses, StoredResponse], Any]
) -> Response:
    tenant = await require_tenant(request)
    r = _Request(request)
    stored = await r.responses.store.get(tenant, response_id)
    if stored is not None:
        result = answer(r.responses, stored)
        return _json(await result if isinstance(result, Awaitable) else result)
    if (
        response_id not in (".", "..")
        and await r.responses.path.of(r.upstream, r.upstream_headers(), r.trace) == "native"
    ):
        # Quoted: the id is one path segment of the upstream's URL, whatever it holds ('?', '#', '/').
        path = f"{PATH}/{quote(response_id, safe='')}{suffix}"
        return await cancel_on_disconnect(request, lambda: _forward(r, method, path, None))
    raise _not_found(response_id)


@router.get("/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Response:
    if request.query_params.get("stream") == "true":
        tenant = await require_tenant(request)
        stored = await _Request(request).responses.store.get(tenant, response_id)
        if stored is not None:
            after = request.query_params.get("starting_after")
            events = replay(stored.response, int(after) if after and after.isdigit() else None)
            return EventStream(iter(_event(e) for e in events))
    return await _stored_or_forward(request, response_id, "GET", "", lambda _, s: s.response)


@router.delete("/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    async def delete(responses: Responses, stored: StoredResponse) -> dict[str, Any]:
        await responses.store.delete(trace_of(request).tenant, stored.id)
        return {"id": stored.id, "object": "response", "deleted": True}

    return await _stored_or_forward(request, response_id, "DELETE", "", delete)


@router.post("/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> Response:
    def cancel(_: Responses, stored: StoredResponse) -> dict[str, Any]:
        raise InvalidRequest(
            "Only responses created with background=true can be cancelled; this one is "
            f"{stored.response.get('status')}.",
            param="response_id",
            code="response_not_cancellable",
        )

    return await _stored_or_forward(request, response_id, "POST", "/cancel", cancel)


@router.get("/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request) -> Response:
    def page(_: Responses, stored: StoredResponse) -> dict[str, Any]:
        return input_items_page(stored.input_items, request.query_params)

    return await _stored_or_forward(request, response_id, "GET", "/input_items", page)


def input_items_page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """One page of a response's input items: ``order`` (desc by default), ``after`` (an item id), ``limit`` 1-100."""
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be asc or desc", param="order", code="invalid_value")
    raw_limit = query.get("limit") or "20"
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100", param="limit", code="invalid_value")
    ordered = items if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"no input item with id '{after}'", param="after", code="invalid_value")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[: int(raw_limit)]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > len(data),
    }
