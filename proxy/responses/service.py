"""What the ``/v1/responses`` routes share for the life of the app: the response store and the path choice."""

from __future__ import annotations

from dataclasses import dataclass

from detector_service.bus.client import PROXY, redis_client
from proxy.metrics import ProxyMetrics
from proxy.responses.native import ResponsesPath
from proxy.responses.store import MemoryResponseStore, RedisResponseStore, ResponseStore
from proxy.settings import ProxySettings
from proxy.supervision.verdicts import REPLY_BLOCK_MS


@dataclass
class Responses:
    store: ResponseStore
    path: ResponsesPath

    async def aclose(self) -> None:
        await self.store.aclose()


def build_responses(settings: ProxySettings, metrics: ProxyMetrics) -> Responses:
    """Stored in Redis (with the session TTL) when the proxy has a Redis URL, else in this process's memory.
    Nothing connects here."""
    store: ResponseStore
    if settings.redis_url:
        store = RedisResponseStore(
            redis_client(settings.redis_url, PROXY, block_ms=REPLY_BLOCK_MS), settings.session_ttl_s, metrics
        )
    else:
        store = MemoryResponseStore(ttl_s=settings.session_ttl_s)
    return Responses(store, ResponsesPath(settings.upstream_responses))
