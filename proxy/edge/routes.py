"""The OpenAI-compatible ``/v1`` endpoints.

Chat goes through :mod:`proxy.edge.chat`. Completions and embeddings are relayed as bytes (their bodies need
no fixing; only errors are normalized, by :mod:`proxy.upstream.client`). Model lists are small and get
normalized (TGI answers a single object; llama.cpp and TGI have no ``/models/{id}``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Depends
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy.edge import chat
from proxy.edge.auth import Tenant, require_tenant
from proxy.edge.inbound import cancel_on_disconnect, json_object, read_body, require
from proxy.edge.relay import EventStream, relay
from proxy.errors import RouteNotFound, UpstreamError
from proxy.hooks import ChatContext, ChatHooks
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace
from proxy.upstream import normalize
from proxy.upstream.chunks import RelayedChunks, upstream_frames
from proxy.upstream.client import Response as UpstreamResponse
from proxy.upstream.client import Upstream, close


# Dependencies are ``async``: FastAPI runs plain functions in a worker thread.
async def _upstream(request: Request) -> Upstream:
    upstream: Upstream = request.state.upstream
    return upstream


async def _trace(request: Request) -> Trace:
    trace: Trace = request.state.trace
    return trace


UpstreamDep = Annotated[Upstream, Depends(_upstream)]
TraceDep = Annotated[Trace, Depends(_trace)]

router = APIRouter(prefix="/v1")
CHAT_PATH = "/v1/chat/completions"


def _settings(request: Request) -> ProxySettings:
    settings: ProxySettings = request.app.state.settings
    return settings


def _metrics(request: Request) -> ProxyMetrics:
    metrics: ProxyMetrics = request.app.state.metrics
    return metrics


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


async def chat_completions(request: Request) -> Response:
    """The hot endpoint, as a plain Starlette route (see :func:`add_chat_route`)."""
    tenant = await require_tenant(request)
    upstream: Upstream = request.state.upstream
    trace: Trace = request.state.trace
    settings = _settings(request)
    body = chat.parse_request(await read_body(request, settings.max_request_bytes, settings.request_body_timeout_s))
    trace.model = body["model"]
    ctx = ChatContext(
        body=body,
        tenant=tenant,
        trace=trace,
        upstream=upstream,
        metrics=_metrics(request),
        upstream_headers=upstream.headers(request.headers.get("authorization"), trace.request_id),
        request_headers=request.headers,
    )
    hooks: ChatHooks = request.app.state.chat_hooks
    return await cancel_on_disconnect(
        request, lambda: chat.respond(ctx, hooks, settings.sse_ping_s, settings.sse_shutdown_grace_s)
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


async def _relay(request: Request, path: str, body: dict[str, Any], upstream: Upstream, trace: Trace) -> Response:
    """Completions and embeddings: bytes through; a stream re-framed event by event."""
    trace.model = body["model"]
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    content = orjson.dumps(body)
    started = time.perf_counter()

    async def done(response: UpstreamResponse) -> None:
        if not response.closed:
            close(response)
            trace.upstream_s += time.perf_counter() - started

    async def call() -> Response:
        response = await upstream.open("POST", path, headers, trace, content)
        if body.get("stream"):
            chunks = RelayedChunks(upstream_frames(response))
            return EventStream(
                relay(chunks, trace, _metrics(request), lambda: done(response), chunks),
                ping=_settings(request).sse_ping_s,
                shutdown_grace_period=_settings(request).sse_shutdown_grace_s,
                background=BackgroundTask(done, response),
            )
        try:
            raw = await upstream.read(response)
        finally:
            await done(response)
        return Response(raw, media_type=response.headers.get("content-type", "application/json"))

    return await cancel_on_disconnect(request, call)


@router.post("/completions")
async def completions(request: Request, tenant: Tenant, upstream: UpstreamDep, trace: TraceDep) -> Response:
    settings = _settings(request)
    body = json_object(await read_body(request, settings.max_request_bytes, settings.request_body_timeout_s))
    require(body, "model", (str,), "a string")
    require(body, "prompt", (str, list), "a string or an array")
    require(body, "stream", (bool,), "a boolean", optional=True)
    return await _relay(request, "/completions", body, upstream, trace)


@router.post("/embeddings")
async def embeddings(request: Request, tenant: Tenant, upstream: UpstreamDep, trace: TraceDep) -> Response:
    settings = _settings(request)
    body = json_object(await read_body(request, settings.max_request_bytes, settings.request_body_timeout_s))
    require(body, "model", (str,), "a string")
    require(body, "input", (str, list), "a string or an array")
    return await _relay(request, "/embeddings", body, upstream, trace)


async def _models(request: Request, upstream: Upstream, trace: Trace) -> dict[str, Any]:
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    payload, _ = await upstream.request_json("GET", "/models", headers, trace)
    return normalize.model_list(payload)


@router.get("/models")
async def list_models(request: Request, tenant: Tenant, upstream: UpstreamDep, trace: TraceDep) -> Response:
    return _json(await _models(request, upstream, trace))


@router.get("/models/{model_id:path}")
async def get_model(
    model_id: str, request: Request, tenant: Tenant, upstream: UpstreamDep, trace: TraceDep
) -> Response:
    if any(segment in (".", "..") for segment in model_id.split("/")):
        # A dot segment would walk the upstream URL out of its models path; no model id has one.
        raise RouteNotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    headers = upstream.headers(request.headers.get("authorization"), trace.request_id)
    try:
        # Quoted: a '?' or '#' in the id is part of the id, not a query or fragment of the upstream's URL.
        payload, _ = await upstream.request_json("GET", f"/models/{quote(model_id, safe='/')}", headers, trace)
    except UpstreamError as exc:
        if exc.status not in (404, 405):
            raise
        payload = None  # llama.cpp and TGI only list models; look it up in the list
    if isinstance(payload, dict) and payload.get("id") == model_id:
        return _json(normalize.model(payload))
    for entry in (await _models(request, upstream, trace))["data"]:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            return _json(entry)
    raise RouteNotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
