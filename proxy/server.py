"""Process entry for ``fama serve``: uvicorn around :func:`proxy.app.create_app`."""

from __future__ import annotations

import uvicorn

from proxy.app import create_app
from proxy.settings import ProxySettings


def run(settings: ProxySettings) -> None:
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
    )
