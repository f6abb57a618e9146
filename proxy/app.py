"""Application factory. Importing this module has no side effects."""

from __future__ import annotations

from fastapi import FastAPI

from proxy.settings import ProxySettings


def create_app(settings: ProxySettings) -> FastAPI:
    app = FastAPI(title="FAMA proxy", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
