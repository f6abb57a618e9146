"""The OpenAI-compatible ``/v1`` endpoints.

Chat goes through :mod:`proxy.edge.chat`. Completions and embeddings are relayed as bytes (their bodies need
no fixing; only errors are normalized, by :mod:`proxy.upstream.client`). Model lists are small and get
normalized (TGI answers a single object); a model is the upstream's answer, or an entry of its list where the
upstream has no ``/models/{id}`` (llama.cpp, TGI). Every other ``/v1`` request is relayed by
:mod:`proxy.edge.passthrough`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy.edge import chat
from proxy.edge.deps import ProxyState, State, Tenant, TraceDep, require_tenant, state_of, trace_of
from proxy.edge.inbound import cancel_on_disconnect, json_object, read_body, require
from proxy.edge.relay import EventStream, relay
from proxy.errors import RouteNotFound, UpstreamError
from proxy.hooks import ChatContext
from proxy.tracing import Trace
from proxy.upstream import normalize
from proxy.upstream.chunks import RelayedChunks, upstream_frames
from proxy.upstream.client import Reply, Upstream

router = APIRouter(prefix="/v1")
CHAT_PATH = "/v1/chat/completions"


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


async def chat_completions(request: Request) -> Response:
    """The hot endpoint, as a plain Starlette route (see :func:`add_chat_route`)."""
    tenant = await require_tenant(request)
    state = state_of(request)
    upstream, settings, trace = state["upstream"], state["settings"], trace_of(request)
    body = chat.parse_request(await read_body(request, settings.max_request_bytes, settings.request_read_timeout_s))
    trace.model = body["model"]
    ctx: ChatContext[Any] = ChatContext(
        body=body,
        tenant=tenant,
        trace=trace,
        upstream=upstream,
        metrics=state["metrics"],
        upstream_headers=upstream.headers(request.headers.get("authorization"), trace.request_id),
        request_headers=request.headers,
    )
    return await cancel_on_disconnect(
        request, lambda: chat.respond(ctx, state["hooks"], settings.sse_ping_s, settings.sse_shutdown_grace_s)
    )


def add_chat_route(app: Starlette) -> None:
    """``POST /v1/chat/completions`` without FastAPI's per-request dependency solving and route machinery: it
    carries nearly all the traffic. Errors still reach the app's handlers, and the metrics' route template is
    this route's path."""
    app.router.routes.insert(0, _NamedRoute(CHAT_PATH, chat_completions, methods=["POST"]))


class _NamedRoute(Route):
    """A plain route that names itself in the scope, as FastAPI's routes do (the metrics' route label)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


async def _relay(request: Request, path: str, body: dict[str, Any], state: ProxyState, trace: Trace) -> Response:
    """Completions and embeddings: bytes through; a stream re-framed event by event."""
    trace.model = body["model"]
    upstream, settings = state["upstream"], state["settings"]
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    content = orjson.dumps(body)

    async def done(reply: Reply) -> None:
        reply.close()

    async def call() -> Response:
        reply = await upstream.open("POST", path, headers, trace, content)
        if body.get("stream"):
            chunks = RelayedChunks(upstream_frames(reply))
            return EventStream(
                relay(chunks, trace, state["metrics"], lambda: done(reply), chunks),
                ping=settings.sse_ping_s,
                shutdown_grace_period=settings.sse_shutdown_grace_s,
                background=BackgroundTask(done, reply),
            )
        try:
            raw = await upstream.read(reply)
        finally:
            reply.close()
        return Response(raw, media_type=reply.content_type)

    return await cancel_on_disconnect(request, call)


@router.post("/completions")
async def completions(request: Request, tenant: Tenant, state: State, trace: TraceDep) -> Response:
    settings = state["settings"]
    body = json_object(await read_body(request, settings.max_request_bytes, settings.request_read_timeout_s))
    require(body, "model", (str,), "a string")
    require(body, "prompt", (str, list), "a string or an array")
    require(body, "stream", (bool,), "a boolean", optional=True)
    return await _relay(request, "/completions", body, state, trace)


@router.post("/embeddings")
async def embeddings(request: Request, tenant: Tenant, state: State, trace: TraceDep) -> Response:
    settings = state["settings"]
    body = json_object(await read_body(request, settings.max_request_bytes, settings.request_read_timeout_s))
    require(body, "model", (str,), "a string")
    require(body, "input", (str, list), "a string or an array")
    return await _relay(request, "/embeddings", body, state, trace)


async def _models(request: Request, upstream: Upstream, trace: Trace) -> dict[str, Any]:
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    payload = await upstream.request_json("GET", "/models", headers, trace)
    return normalize.model_list(payload)


@router.get("/models")
async def list_models(request: Request, tenant: Tenant, state: State, trace: TraceDep) -> Response:
    return _json(await _models(request, state["upstream"], trace))


def _about_the_model(error: UpstreamError, model_id: str) -> bool:
    """A 404 that is the upstream's answer about this model (OpenAI's ``model_not_found``), not a server without
    the route (a framework's ``{"detail": "Not Found"}``, llama.cpp's "File Not Found")."""
    if error.code == "model_not_found" or error.param == "model":
        return True
    return "model" in error.message.lower() and model_id in error.message


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request, tenant: Tenant, state: State, trace: TraceDep) -> Response:
    if any(segment in (".", "..") for segment in model_id.split("/")):
        # A dot segment would walk the upstream URL out of its models path; no model id has one.
        raise RouteNotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    upstream = state["upstream"]
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    try:
        # Quoted: a '?' or '#' in the id is part of the id, not a query or fragment of the upstream's URL.
        payload = await upstream.request_json("GET", f"/models/{quote(model_id, safe='/')}", headers, trace)
    except UpstreamError as exc:
        if exc.status == 405 or (exc.status == 404 and not _about_the_model(exc, model_id)):
            payload = None  # llama.cpp and TGI only list models; look it up in the list
        else:
            raise
    if isinstance(payload, dict):
        return _json(normalize.model(payload))
    for entry in (await _models(request, upstream, trace))["data"]:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            return _json(entry)
    raise RouteNotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
