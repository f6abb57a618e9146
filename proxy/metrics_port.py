"""``/metrics`` on a port of its own (``FAMA_METRICS_PORT``), so that the port clients reach need not expose it.

The server runs in the app's event loop, opened and closed by its lifespan. Its socket is bound with
``SO_REUSEPORT``: with ``--workers N`` every worker process serves the port, and a scrape lands on one of them,
as it does on the main port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings


def metrics_app(metrics: ProxyMetrics) -> Starlette:
    async def exposition(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", exposition, methods=["GET"])])


class _Server(uvicorn.Server):
    """uvicorn inside the proxy's loop: the proxy's own server owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class MetricsServer:
    def __init__(self, metrics: ProxyMetrics, host: str, port: int) -> None:
        config = uvicorn.Config(
            metrics_app(metrics), host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        self._server = _Server(config)
        self._host, self._port = host, port
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind (an occupied port fails here, at startup) and serve in the background."""
        sock = _socket(self._host, self._port)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # the reason it could not start
                raise RuntimeError(f"the metrics server on {self._host}:{self._port} stopped at once")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task


def metrics_server(settings: ProxySettings, metrics: ProxyMetrics) -> MetricsServer | None:
    """The separate metrics server when ``metrics_port`` is set; None when ``/metrics`` stays on the API port."""
    if settings.metrics_port is None:
        return None
    return MetricsServer(metrics, settings.metrics_host or settings.host, settings.metrics_port)
