"""Operational endpoints: ``/healthz`` (the process is alive), ``/readyz`` (the upstream answers),
``/metrics`` (Prometheus exposition of the app's own registry)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from proxy.edge.deps import State
from proxy.errors import UpstreamNotReady

router = APIRouter()
metrics_router = APIRouter()  # on the API port unless FAMA_METRICS_PORT moves it (proxy.metrics_port)


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(state: State) -> Response:
    problem = await state["readiness"].problem(state["upstream"])
    if problem is not None:
        raise UpstreamNotReady(problem)
    return Response(b'{"status":"ready"}', media_type="application/json")


@metrics_router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)
