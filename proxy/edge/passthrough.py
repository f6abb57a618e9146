"""Every other ``/v1/*`` request, relayed to the upstream as is (see :mod:`proxy.upstream.passthrough`).

The route is the app's last one: whatever the proxy serves itself (chat, completions, embeddings, models, its own
``/v1/fama`` endpoints) matches first, and a method those routes do not take (``DELETE /v1/models/{id}``) falls
through to here. The proxy's client authentication applies; the request body is streamed to the upstream under
the same size and time limits as on the other routes. A client that goes away cancels the upstream request: at once
without a request body; with one, while it is being sent and once the upstream's headers are in, not in between
(the body and a disconnect come over the same channel, which the upstream client is reading).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import unquote

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.edge.deps import require_tenant, state_of, trace_of
from proxy.edge.inbound import ClientDisconnected, cancel_on_disconnect
from proxy.edge.routes import _NamedRoute
from proxy.errors import PayloadTooLarge, ProxyError, RequestTimeout, RouteNotFound, UpstreamStreamError
from proxy.upstream.passthrough import Relayed, send

logger = logging.getLogger("fama.proxy.passthrough")

PREFIX = "/v1"
RELAY_PATH = PREFIX + "/{path:path}"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_OWN_PREFIX = PREFIX + "/fama"  # the proxy's own endpoints are never the upstream's


class ClientBody:
    """The client's request body as it arrives, at most ``limit`` bytes, all of it within ``timeout_s``.

    Iterated by the upstream client on its own task: a failure here surfaces there as a transport error, so the
    failure is kept in ``error`` for the route to report instead.
    """

    def __init__(self, request: Request, limit: int, timeout_s: float) -> None:
        self._request = request
        self._limit = limit
        self._timeout_s = timeout_s
        self.error: ProxyError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        size = 0
        parts = self._request.stream()
        while True:
            try:
                part = await asyncio.wait_for(anext(parts), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                timeout = RequestTimeout(f"the request body was not received within {self._timeout_s:g}s")
                raise self._fail(timeout) from exc
            except ClientDisconnect as exc:
                raise self._fail(ClientDisconnected("the client closed the connection")) from exc
            size += len(part)
            if size > self._limit:
                raise self._fail(PayloadTooLarge(f"request body is larger than {self._limit} bytes"))
            if part:
                yield part

    def _fail(self, error: ProxyError) -> ProxyError:
        self.error = error
        return error


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


class _BodyCut(Exception):
    """The upstream's body broke off after the headers went out (logged where it happens)."""


class RelayedResponse(StreamingResponse):
    """The upstream's answer with its body streamed as it arrives; the upstream response is closed however the
    relay ends (a client disconnect included, which cancels the upstream request)."""

    def __init__(self, relayed: Relayed) -> None:
        self._relayed = relayed
        self._sse = any(
            name == "content-type" and value.startswith("text/event-stream") for name, value in relayed.headers
        )
        super().__init__(self._body(), status_code=relayed.status)
        self.raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in relayed.headers]

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._relayed.body():
                yield part
        except UpstreamStreamError as exc:
            logger.warning("relayed body cut short (request %s): %s", self._relayed.request_id, exc.message)
            if not self._sse:
                raise _BodyCut from exc
            yield b"data: " + orjson.dumps(exc.body()) + b"\n\n"  # the SDK raises APIError for it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _BodyCut:
            # The headers are out: leaving the response incomplete makes the server cut the connection, the only
            # way left to tell the client the body is not whole.
            return
        finally:
            self._relayed.close()


async def relay_request(request: Request) -> Response:
    await require_tenant(request)
    path = request.url.path
    if path == _OWN_PREFIX or path.startswith(_OWN_PREFIX + "/"):
        raise RouteNotFound(f"Unknown request URL: {request.method} {path}", code="unknown_url")
    state = state_of(request)
    settings, upstream, trace = state["settings"], state["upstream"], trace_of(request)
    raw_path = request.scope.get("raw_path") or path.encode()
    target = raw_path.decode("latin-1")[len(PREFIX) :]
    if any(segment in (".", "..") for segment in unquote(target).split("/")):
        # Sent as is, a dot segment would leave the base URL's path wherever the upstream (or a proxy in front of
        # it) resolves them, with the proxy's upstream key; no OpenAI route has one.
        raise RouteNotFound(f"Unknown request URL: {request.method} {path}", code="unknown_url")
    if query := request.scope.get("query_string"):
        target += "?" + query.decode("latin-1")
    body = (
        ClientBody(request, settings.max_request_bytes, settings.request_read_timeout_s) if _has_body(request) else None
    )

    async def call() -> Relayed:
        try:
            return await send(upstream, request.method, target, request.headers.items(), trace, body)
        except ProxyError:
            if body is not None and body.error is not None:
                raise body.error from None
            raise

    if body is None:
        relayed = await cancel_on_disconnect(request, call)
    else:
        relayed = await call()
    return RelayedResponse(relayed)


def add_relay_route(app: Starlette) -> None:
    """Call last: the relay takes what no earlier route matched."""
    app.router.routes.append(_NamedRoute(RELAY_PATH, relay_request, methods=METHODS))
