"""Errors the proxy reports. Every one reaches the client as OpenAI's error body,
``{"error": {"message", "type", "param", "code"}}``, with ``code`` a string or null.

ProxyError                    base: HTTP status + the four OpenAI error fields
├── InvalidRequest            400 ``invalid_request_error``; ``param`` names the offending field
├── PayloadTooLarge           413 request body above ``max_request_bytes``
├── RequestTimeout            408 request not received within ``request_read_timeout_s``
├── AuthenticationFailed      401 ``invalid_api_key``
├── RouteNotFound             404 / 405 for paths and methods the proxy does not serve
├── UpstreamError             the upstream answered an error: its status kept, its body normalized,
│                             ``retry-after`` / rate-limit headers passed through
├── UpstreamUnreachable       502 connect failure or a response that is not what the protocol promises
├── UpstreamTimeout           504 connect/read deadline passed
├── UpstreamNotReady          503 from ``/readyz``
└── UpstreamStreamError       a failure after the stream's headers were sent; rendered as an SSE
                              ``data: {"error": {...}}`` event (the SDK raises ``APIError``), then close

Anything else that escapes a handler is a bug in the proxy: it is logged with the request id and
answered with an OpenAI-shaped 500 as a last resort (see :mod:`proxy.tracing`).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type_ is not None:
            self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RouteNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UpstreamError(ProxyError):
    """The upstream's own error, already normalized; ``status`` is the upstream's."""


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamNotReady(ProxyError):
    status = 503
    type = "server_error"
    code = "upstream_not_ready"


class UpstreamStreamError(ProxyError):
    """Raised inside a stream; the relay turns it into a final SSE error event."""

    type = "server_error"
    code = "upstream_stream_error"


def error_response(exc: ProxyError) -> Response:
    return Response(
        orjson.dumps(exc.body()), status_code=exc.status, media_type="application/json", headers=exc.headers
    )
