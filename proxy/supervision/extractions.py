"""The proxy's read side of the LLM-backed DCE: cached policy extractions, never the LLM itself.

``ExtractionReader.get(policy)`` answers from a small in-process cache, else with one ``GET`` of
``keys.extraction_key(sha256(policy))`` bounded by ``timeout_s``. A miss, a Redis error or a timeout
answer ``None`` (the injection then uses the deterministic DCE); only found extractions are kept
locally, so a turn sees one as soon as the detector service has stored it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus import keys, values
from detector_service.contract.extraction import EXTRACTION_VERSION, PolicyExtraction, policy_hash
from proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)


class ExtractionReader:
    def __init__(
        self,
        redis: Redis,
        metrics: ProxyMetrics | None = None,
        *,
        timeout_s: float = 0.05,
        keep_s: float = 300.0,
        max_entries: int = 64,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._timeout = timeout_s
        self._keep = keep_s  # an extraction only changes with its policy text, whose hash is the key
        self._max = max_entries
        self._found: OrderedDict[str, tuple[float, PolicyExtraction]] = OrderedDict()

    async def get(self, policy: str) -> PolicyExtraction | None:
        if not policy.strip():
            return None
        digest = policy_hash(policy)
        hit = self._found.get(digest)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            self._found.move_to_end(digest)
            return hit[1]
        try:
            async with asyncio.timeout(self._timeout):
                raw = await values.get(self._redis, keys.extraction_key(digest))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("extraction_read", digest, exc)
            return None
        if raw is None:
            return None
        try:
            extraction = PolicyExtraction.model_validate_json(raw)
        except ValidationError as exc:
            self._failed("extraction_decode", digest, exc)
            return None
        if extraction.v != EXTRACTION_VERSION or extraction.policy_hash != digest:
            return None
        self._found[digest] = (now + self._keep, extraction)
        self._found.move_to_end(digest)
        while len(self._found) > self._max:
            self._found.popitem(last=False)
        return extraction

    def _failed(self, op: str, digest: str, exc: BaseException) -> None:
        log.warning("cached policy extraction %s unavailable (%s): %r", digest[:12], op, exc)
        if self._metrics is not None:
            self._metrics.redis_errors.labels(op=op).inc()
