"""Whether the upstream answers: ``GET {upstream}/models`` with a short timeout, cached so probes cost nothing."""

from __future__ import annotations

import time

from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.upstream.client import Upstream


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
