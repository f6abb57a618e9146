"""Application factory. Importing this module has no side effects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from proxy import admin, health, outcomes, routes
from proxy.auth import Authenticator
from proxy.chat import ChatHooks
from proxy.errors import InvalidRequest, ProxyError, RouteNotFound, error_response
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.supervisor import build_supervisor
from proxy.tracing import TracingMiddleware
from proxy.upstream import Upstream


class ProxyState(TypedDict):
    upstream: Upstream


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


def create_app(settings: ProxySettings, hooks: ChatHooks | None = None) -> FastAPI:
    """The proxy. ``hooks`` is the supervision seam of the chat pipeline (see :mod:`proxy.chat`); by default
    the supervisor of :mod:`proxy.supervisor`, with ``settings.mode`` and the profile ``settings.profile``."""
    metrics = ProxyMetrics()
    chat_hooks = hooks if hooks is not None else build_supervisor(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[ProxyState]:
        upstream = Upstream(settings, metrics)
        await chat_hooks.start()
        try:
            yield {"upstream": upstream}
        finally:
            await chat_hooks.stop()
            await upstream.aclose()

    app = FastAPI(title="FAMA proxy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = Authenticator(settings.api_keys)
    app.state.chat_hooks = chat_hooks
    app.state.readiness = health.Readiness()
    app.add_exception_handler(ProxyError, _proxy_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(TracingMiddleware, metrics=metrics)
    app.include_router(health.router)
    routes.add_chat_route(app)
    app.include_router(routes.router)
    app.include_router(outcomes.router)
    app.include_router(admin.router)
    return app
