"""The one Redis client factory of both services, with each side's timeouts named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    read_margin_s: float  # how long a read may outlast the longest blocking read the client makes
    one_quick_retry: bool  # one immediate retry instead of the client's default back-off retries
    health_check_interval_s: int = 0


# The proxy: an outage must surface as ``outage`` within a verdict deadline, not as a slow ``deadline``; a pooled
# connection may be stale after a Redis restart, hence one immediate retry.
PROXY = Timeouts(connect_s=1.0, read_margin_s=2.0, one_quick_retry=True, health_check_interval_s=30)
# The detector service: nothing waits on it but its own loop.
DETECTOR = Timeouts(connect_s=5.0, read_margin_s=5.0, one_quick_retry=False)


def redis_client(url: str, timeouts: Timeouts, *, block_ms: int) -> Redis:
    """A client of ``url``. Its read timeout outlasts its longest blocking read (``block_ms``), or every idle read
    would look like a failure."""
    options: dict[str, Any] = {}
    if timeouts.one_quick_retry:
        options["retry"] = Retry(NoBackoff(), 1)
    if timeouts.health_check_interval_s:
        options["health_check_interval"] = timeouts.health_check_interval_s
    return Redis.from_url(
        url,
        socket_connect_timeout=timeouts.connect_s,
        socket_timeout=block_ms / 1000 + timeouts.read_margin_s,
        **options,
    )
