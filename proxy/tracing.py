"""Per-request context, ``x-request-id``, request metrics and the last-resort error handler.

A plain ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer and cost a task per request). It puts
a :class:`Trace` on ``request.state.trace`` that handlers fill in (model, upstream time, tenant), adds
``x-request-id`` to every response, and records ``fama_requests_total``, the request duration and the
proxy's own overhead (request time minus upstream time) once the last byte is sent.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import ProxyError, error_response
from proxy.metrics import ProxyMetrics

logger = logging.getLogger("fama.proxy")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# fama_requests_total, request duration, upstream duration, overhead: the children for one label set.
_Series = tuple[Counter, Histogram, Histogram, Histogram]


@dataclass(slots=True)
class Trace:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    tenant: str = "default"
    upstream_s: float = 0.0


def request_id_from(scope: Scope) -> str | None:
    """The client's ``x-request-id`` when it is a sane one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
            break
    return None


class RequestIds:
    """Generated request ids: 32 hex characters, a random per-process prefix and a counter. Unique like a
    uuid4, without a ``urandom`` system call per request."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class TracingMiddleware:
    def __init__(self, app: ASGIApp, metrics: ProxyMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._ids = RequestIds()
        # Metric children by label values: ``.labels()`` takes a lock and builds a key on every call.
        self._children: dict[tuple[str, str, str], _Series] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = Trace(request_id_from(scope) or self._ids.next())
        scope.setdefault("state", {})["trace"] = trace
        status = 500
        started_response = False
        header = (b"x-request-id", trace.request_id.encode("latin-1"))

        async def send_traced(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except Exception:
            logger.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], trace.request_id)
            if not started_response:
                response = error_response(ProxyError("internal error in the proxy; see its log", code="internal_error"))
                await response(scope, receive, send_traced)
        finally:
            self._record(scope, trace, status)

    def _record(self, scope: Scope, trace: Trace, status: int) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        elapsed = time.perf_counter() - trace.started
        requests, duration, upstream, overhead = self._series(
            template, status, self.metrics.model_label(trace.model) if status < 400 else ""
        )
        requests.inc()
        duration.observe(elapsed)
        if trace.upstream_s > 0:
            upstream.observe(trace.upstream_s)
            overhead.observe(max(elapsed - trace.upstream_s, 0.0))

    def _series(self, template: str, status: int, model: str) -> _Series:
        key = (template, str(status), model)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            children = (
                m.requests.labels(template, key[1], model),
                m.request_duration.labels(template),
                m.upstream_duration.labels(template),
                m.overhead.labels(template),
            )
            if len(self._children) < 4096:  # label sets are bounded (see proxy.metrics); the cache is capped anyway
                self._children[key] = children
        return children
