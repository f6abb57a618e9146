"""The composition root: the application factory and the supervisor it plugs in. Importing this module has no
side effects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from detector_service.bus.client import PROXY, redis_client
from detector_service.bus.profiles import ProfileWatch
from detector_service.bus.writer import BatchWriter
from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import load_profile
from detector_service.engine import Engines
from detector_service.llm.follows import Judges, judge_builder
from proxy.edge import admin, health, outcomes, passthrough, responses, routes
from proxy.edge.auth import Authenticator
from proxy.edge.deps import ProxyState, Supervision
from proxy.edge.limits import client_limits
from proxy.errors import InvalidRequest, ProxyError, RouteNotFound, error_response
from proxy.hooks import ChatHooks
from proxy.metrics import ProxyMetrics
from proxy.metrics_port import metrics_server
from proxy.responses.service import build_responses
from proxy.settings import ProxySettings
from proxy.supervision.extractions import ExtractionReader
from proxy.supervision.recorder import RedisRecorder, recorder_for
from proxy.supervision.sessions import MemorySessionStore, RedisSessionStore
from proxy.supervision.supervisor import Supervisor
from proxy.supervision.verdicts import REPLY_BLOCK_MS, EmbeddedVerdicts, RedisVerdicts, process_instance_id
from proxy.tracing import TracingMiddleware
from proxy.upstream.client import Upstream
from proxy.upstream.readiness import Readiness


def embedded_judges(settings: ProxySettings, profiles: ProfileHolder) -> Judges:
    """The LLM judge run in-process when the profile in force enables it and no detector service is used."""
    return Judges(profiles, judge_builder(settings.judge_api_key))


def build_supervisor(settings: ProxySettings, metrics: ProxyMetrics) -> Supervisor:
    """The supervisor for ``fama serve``: embedded detectors without a Redis URL, the Redis bus with one.

    Nothing connects here; connections open lazily, the verdict reader and recorder start in the lifespan.
    """
    profile = load_profile(settings.profile or None)
    # The one holder of the profile in force; a push swaps it (``POST /admin/profile``, or the watch in Redis mode).
    profiles = ProfileHolder.of(profile)
    profiles.listen(metrics.profile_switched)
    if not settings.redis_url:
        return Supervisor(
            settings.mode,
            profiles,
            EmbeddedVerdicts(Engines(profiles), metrics, embedded_judges(settings, profiles)),
            MemorySessionStore(ttl_s=settings.session_ttl_s),
            metrics,
            recorder_for(None, metrics, session_ttl_s=settings.session_ttl_s),
        )
    # Short connect timeout and one quick retry: an outage must surface as ``outage``, not a slow ``deadline``.
    redis = redis_client(settings.redis_url, PROXY, block_ms=REPLY_BLOCK_MS)
    # One batched writer: a turn's records and its session state in one round trip (the recorder starts and stops it).
    writer = BatchWriter(redis)
    recorder = RedisRecorder(redis, metrics, writer=writer, session_ttl_s=settings.session_ttl_s)
    return Supervisor(
        settings.mode,
        profiles,
        RedisVerdicts(redis, process_instance_id(settings.instance_id), metrics),
        RedisSessionStore(redis, settings.session_ttl_s, metrics, timeout_s=profile.deadline_ms / 1000, writer=writer),
        metrics,
        recorder,
        closing=redis,
        # The detector service fills the cache (profile ``llm_agents``); a turn only ever reads it, and only while
        # the profile in force names DCE there.
        extractions=ExtractionReader(redis, metrics, timeout_s=min(0.05, profile.deadline_ms / 1000)),
    )


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's own 404/405 (and any other HTTPException) in OpenAI shape, never a framework page."""
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 405:
        error = RouteNotFound(
            f"Method {request.method} is not allowed on {request.url.path}",
            status=405,
            code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    elif exc.status_code == 404:
        error = RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}", code="unknown_url")
    else:
        error = ProxyError(str(exc.detail), status=exc.status_code, type_="invalid_request_error")
    return error_response(error)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return error_response(InvalidRequest(str(first.get("msg", "invalid request")), param=param))


def _supervision(hooks: ChatHooks[Any], watch: ProfileWatch | None) -> Supervision | None:
    # The one place that knows which hooks it plugged in; the operator endpoints get the parts, never the hooks.
    if not isinstance(hooks, Supervisor):
        return None
    return Supervision(hooks.mode, hooks.profiles, hooks.store, hooks.recorder, hooks.settled, watch)


@asynccontextmanager
async def _watched(settings: ProxySettings, hooks: ChatHooks[Any]) -> AsyncIterator[ProfileWatch | None]:
    """With Redis, keeps the supervisor's profile on the pushed one for as long as the app runs (the stored profile
    is in force before the first request); the watch publishes this replica's pushes too."""
    if not settings.redis_url or not isinstance(hooks, Supervisor):
        yield None
        return
    redis = redis_client(settings.redis_url, PROXY, block_ms=0)
    watch = ProfileWatch(redis, hooks.profiles)
    await watch.start()
    try:
        yield watch
    finally:
        await watch.stop()
        await redis.aclose()


def create_app(
    settings: ProxySettings, hooks: ChatHooks[Any] | None = None, metrics: ProxyMetrics | None = None
) -> FastAPI:
    """The proxy. ``hooks`` is the supervision seam of the chat pipeline (see :mod:`proxy.edge.chat`); by default
    the supervisor of :mod:`proxy.supervision.supervisor`, with ``settings.mode`` and the profile ``settings.profile``.
    ``metrics``: the registry to count in (a fresh one by default).

    Everything the handlers use is opened by the lifespan and handed to them as one :class:`ProxyState`."""
    metrics = metrics if metrics is not None else ProxyMetrics()
    chat_hooks = hooks if hooks is not None else build_supervisor(settings, metrics)
    responses_api = build_responses(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[ProxyState]:
        separate_metrics = metrics_server(settings, metrics)
        if separate_metrics is not None:
            await separate_metrics.start()  # first: a port already in use fails the startup before anything opens
        upstream = Upstream(settings, metrics)
        await chat_hooks.start()
        try:
            async with _watched(settings, chat_hooks) as watch:
                yield ProxyState(
                    settings=settings,
                    metrics=metrics,
                    auth=Authenticator(settings.api_keys),
                    upstream=upstream,
                    readiness=Readiness(),
                    hooks=chat_hooks,
                    supervision=_supervision(chat_hooks, watch),
                    client_limits=client_limits(settings, metrics),
                    responses=responses_api,
                )
        finally:
            await chat_hooks.stop()
            await responses_api.aclose()
            await upstream.aclose()
            if separate_metrics is not None:
                await separate_metrics.stop()

    app = FastAPI(title="FAMA proxy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_exception_handler(ProxyError, _proxy_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(TracingMiddleware, metrics=metrics)
    app.include_router(health.router)
    if settings.metrics_port is None:
        app.include_router(health.metrics_router)
    routes.add_chat_route(app)
    app.include_router(responses.router)  # before any catch-all /v1 relay
    app.include_router(routes.router)
    app.include_router(outcomes.router)
    app.include_router(admin.router)
    passthrough.add_relay_route(app)
    return app
