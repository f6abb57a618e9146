"""Process entry for ``fama serve``: the optional local model, then uvicorn around :func:`proxy.app.create_app`."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from detector_service.contract.profile import load_profile
from detector_service.contract.redaction import logging_config
from detector_service.llm.judge import judge_key
from proxy.app import create_app
from proxy.edge import limits
from proxy.settings import ProxySettings

logger = logging.getLogger("fama.server")

# With several workers uvicorn imports the app in fresh processes, so the settings built by the CLI travel to
# them, complete and validated, in this one variable.
SETTINGS_ENV = "FAMA_SERVE_SETTINGS_JSON"


class Shutdown(BaseException):
    """SIGTERM/SIGINT outside uvicorn's own handling (startup, or re-raised after its graceful shutdown)."""


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def _hang_up(signum: int, frame: FrameType | None) -> None:
    # A closed terminal: shut down as on SIGTERM (gracefully while uvicorn runs). By default SIGHUP would end
    # the process at once, leaving the local model, which has its own session, running.
    signal.raise_signal(signal.SIGTERM)


@contextmanager
def _shutdown_on_signals() -> Iterator[None]:
    # uvicorn restores the previous handlers after its graceful shutdown and re-raises the signal it caught;
    # with the default SIGTERM disposition that would kill the process before the local model child is stopped.
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _hang_up)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def settings_to_env(settings: ProxySettings) -> str:
    return json.dumps({name: _plain(getattr(settings, name)) for name in type(settings).model_fields})


def settings_from_env(environ: Mapping[str, str]) -> ProxySettings:
    # model_validate does not read FAMA_* variables: the parent's resolved settings are the whole truth.
    return ProxySettings.model_validate(json.loads(environ[SETTINGS_ENV]))


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the app for the settings the parent put in the environment."""
    return create_app(settings_from_env(os.environ))


def connection_options(settings: ProxySettings) -> dict[str, Any]:
    """uvicorn's connection handling for the proxy: the httptools parser guarded against slow and greedy
    clients (:mod:`proxy.edge.limits`; the app supplies the limits), the idle keep-alive timeout and the
    optional cap on a process's connections."""
    return {
        "http": limits.PROTOCOL,
        # No WebSocket routes: an upgrade would hand the connection to a protocol without these limits.
        "ws": "none",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections or None,
    }


def secrets_of(settings: ProxySettings) -> list[str]:
    """Every secret the proxy's settings hold: what its logs must never show."""
    judge = judge_key(settings.judge_api_key, load_profile(settings.profile or None).judge)
    return [*settings.secrets(), *filter(None, [judge])]


def log_config(settings: ProxySettings) -> dict[str, Any]:
    # httpx2 (the openai SDK of the judge, the local model's probes) logs every request at info.
    return logging_config(settings.log_level, secrets_of(settings), quiet=["httpx", "httpx2"])


def _serve(settings: ProxySettings) -> None:
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # Applied again in every worker process: the root logger and uvicorn's, all behind the redacting filter.
        "log_config": log_config(settings),
        "timeout_graceful_shutdown": max(1, round(settings.graceful_shutdown_s)),
        # The proxy sets x-request-id and its own headers; uvicorn's Server/Date add nothing clients need.
        "server_header": False,
        # A line per request costs more CPU than the proxy itself adds; requests are counted in /metrics and
        # carry x-request-id. FAMA_ACCESS_LOG=true turns uvicorn's access log back on.
        "access_log": settings.access_log,
        # uvloop and the httptools parser: a fraction of the per-request CPU of asyncio's loop and h11.
        "loop": "asyncio" if sys.platform == "win32" else "uvloop",  # uvloop has no Windows build
        **connection_options(settings),
    }
    if settings.workers > 1:
        if not settings.redis_url:
            # Sessions, guidance carried to the next turn and the intervention log live in each process's memory.
            logger.warning(
                "%d workers without FAMA_REDIS_URL: each worker keeps its own sessions and records; a "
                "conversation whose turns land on different workers loses its carried corrections. Set "
                "FAMA_REDIS_URL to share them.",
                settings.workers,
            )
        os.environ[SETTINGS_ENV] = settings_to_env(settings)
        uvicorn.run("proxy.server:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)


def run(settings: ProxySettings) -> None:
    """Run ``fama serve`` until SIGTERM/SIGINT; with ``local_model`` the bundled model is the upstream."""
    from proxy.local_model.model import LocalModel, LocalModelOptions

    # Before uvicorn applies it too: the local model starts (and logs) first.
    logging.config.dictConfig(log_config(settings))
    try:
        with _shutdown_on_signals():
            if not settings.local_model:
                _serve(settings)
                return
            if "upstream_url" in settings.model_fields_set:
                logger.warning("--local-model replaces the configured upstream %s", settings.upstream_url)
            with LocalModel(LocalModelOptions.from_settings(settings)) as model:
                _serve(settings.model_copy(update={"upstream_url": model.base_url}))
    except Shutdown as stop:
        logger.info("stopped by %s", stop)
