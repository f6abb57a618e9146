"""Operational endpoints: ``/healthz`` (the process is alive), ``/readyz`` (the upstream answers),
``/metrics`` (Prometheus exposition of the app's own registry)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import UpstreamNotReady, UpstreamTimeout, UpstreamUnreachable
from proxy.metrics import ProxyMetrics
from proxy.upstream.client import Upstream

router = APIRouter()
metrics_router = APIRouter()  # on the API port unless FAMA_METRICS_PORT moves it (proxy.metrics_port)


class Readiness:
    """``GET {upstream}/models`` with a short timeout; the answer is cached so probes cost nothing."""

    def __init__(self, ttl_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._checked = float("-inf")
        self._problem: str | None = "not checked yet"

    async def problem(self, upstream: Upstream) -> str | None:
        now = time.monotonic()
        if now - self._checked >= self.ttl_s:
            self._problem = await self._probe(upstream)
            self._checked = time.monotonic()
        return self._problem

    async def _probe(self, upstream: Upstream) -> str | None:
        try:
            status = await upstream.probe("/models", self.timeout_s)
        except (UpstreamUnreachable, UpstreamTimeout) as exc:
            return exc.message
        # 401/403: the upstream is up and wants the clients' keys, which the probe does not have.
        if status >= 400 and status not in (401, 403):
            return f"upstream answered {status} to GET /models"
        return None


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    readiness: Readiness = request.app.state.readiness
    upstream: Upstream = request.state.upstream
    problem = await readiness.problem(upstream)
    if problem is not None:
        raise UpstreamNotReady(problem)
    return Response(b'{"status":"ready"}', media_type="application/json")


@metrics_router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: ProxyMetrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
