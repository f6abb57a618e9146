"""Where Responses API answers are kept, so ``previous_response_id``, retrieve and the input-items listing work.

One record per response, per tenant: the Response object as the client got it, its input items, the chat
conversation of its ``previous_response_id`` chain up to and including its own output (without instructions,
which a chain does not carry over), and the supervision session the chain belongs to. In memory (bounded, with a
TTL) in embedded mode; with Redis one JSON value under ``fama:response:<tenant>:<id>`` with a TTL.

A write that fails is logged and counted (``fama_redis_errors_total{op="response_put"}``); the answer still goes
out. A read that fails is a 503: without the earlier conversation a chained request cannot be answered.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus import values
from detector_service.bus.keys import response_key
from proxy.errors import ProxyError
from proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "response_store_unavailable"


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]  # chat messages of the chain, this response's output included
    session_id: str

    @property
    def id(self) -> str:
        return str(self.response["id"])

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "response": self.response,
                "input_items": self.input_items,
                "conversation": self.conversation,
                "session_id": self.session_id,
            }
        )

    @classmethod
    def loads(cls, raw: bytes) -> StoredResponse:
        data = orjson.loads(raw)
        return cls(data["response"], data["input_items"], data["conversation"], data["session_id"])


class ResponseStore(Protocol):
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None: ...

    async def put(self, tenant: str, stored: StoredResponse) -> None: ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryResponseStore:
    """A bounded LRU with a TTL, for one process (embedded mode)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        key = (tenant, response_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        # Kept serialized: a caller that changes what it got never changes what is stored.
        return StoredResponse.loads(entry[1])

    async def put(self, tenant: str, stored: StoredResponse) -> None:
        key = (tenant, stored.id)
        self._entries[key] = (time.monotonic() + self.ttl_s, stored.dumps())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, tenant: str, response_id: str) -> bool:
        return self._entries.pop((tenant, response_id), None) is not None

    async def aclose(self) -> None:
        self._entries.clear()


class RedisResponseStore:
    def __init__(self, redis: Redis, ttl_s: int, metrics: ProxyMetrics, owns_client: bool = True) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._owns_client = owns_client

    def _failed(self, op: str, exc: RedisError) -> None:
        self.metrics.redis_errors.labels(op=op).inc()
        log.warning("response store %s failed: %s", op, exc)

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        try:
            raw = await values.get(self.redis, response_key(tenant, response_id))
        except RedisError as exc:
            self._failed("response_get", exc)
            raise StoreUnavailable("the response store is unavailable; try again") from exc
        return None if raw is None else StoredResponse.loads(raw if isinstance(raw, bytes) else raw.encode())

    async def put(self, tenant: str, stored: StoredResponse) -> None:
        try:
            await values.put(self.redis, response_key(tenant, stored.id), stored.dumps(), ttl_s=self.ttl_s)
        except RedisError as exc:
            self._failed("response_put", exc)

    async def delete(self, tenant: str, response_id: str) -> bool:
        try:
            return await values.delete(self.redis, response_key(tenant, response_id))
        except RedisError as exc:
            self._failed("response_delete", exc)
            raise StoreUnavailable("the response store is unavailable; try again") from exc

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
