"""The detector worker's HTTP side: ``/healthz`` (live), ``/readyz`` (Redis answers), ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from detector_service.bus import values
from detector_service.metrics import DetectorMetrics

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 1.0


def create_health_app(redis: Redis, metrics: DetectorMetrics) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await values.ping(redis)
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.redis_errors.labels(op="ping").inc()
            return JSONResponse({"status": "unavailable", "error": f"redis: {exc}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ]
    )


class HealthServer(uvicorn.Server):
    """uvicorn inside the worker's event loop; the worker, not uvicorn, owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def health_server(app: Starlette, host: str, port: int) -> HealthServer:
    # log_config=None: the process's logging (and its redacting filter) stays as the service set it up.
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, log_level="warning", access_log=False, lifespan="off"
    )
    return HealthServer(config)
