"""A member of a Redis Streams consumer group: the loop around a handler (arq/taskiq shape), nothing about turns.

The loop blocks on ``XREADGROUP`` and hands each batch to the handler; the handler acknowledges an entry (with
:meth:`GroupConsumer.ack_soon`) only once it is done with it, and the ``XACK`` is pipelined with the next
``XREADGROUP``: one round trip per batch instead of two. Now and then the loop reclaims entries left idle by
crashed consumers and hands them to the handler as well, and refreshes the group's lag and pending gauges. A
Redis failure backs off (cut short by ``stop``); a vanished group is created again. ``until_idle`` ("burst")
returns once nothing is pending and nothing new arrives, so tests need no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from detector_service.bus import streams
from detector_service.metrics import DetectorMetrics

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 2.0
MAX_BACKOFF_S = 2.0
ACK_FLUSH_TIMEOUT_S = 1.0  # bounds the last acknowledgement of a stopping consumer

Handler = Callable[[list[streams.Entry]], Awaitable[None]]


class GroupConsumer:
    def __init__(
        self,
        redis: Redis,
        stream: str,
        group: str,
        consumer: str,
        metrics: DetectorMetrics,
        *,
        batch_size: int,
        block_ms: int,
        claim_idle_ms: int,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.metrics = metrics
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        # The loop's own connection: its reads, acknowledgements and the handler's replies skip the client's
        # per-command machinery.
        self.lane = streams.Lane(redis)
        # Handled but not yet acknowledged: the acknowledgement rides with the next read (one round trip less
        # per batch); ``flush_acks`` sends it on its own before anything that must see it (stats, exit).
        self._unacked: list[str] = []

    def ack_soon(self, ids: list[str]) -> None:
        self._unacked.extend(ids)

    async def run(self, handle: Handler, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until the group has no work left)."""
        claim_every = max(self.claim_idle_ms / 2000, 0.05)
        next_claim = 0.0
        next_stats = 0.0
        backoff = 0.1
        await self._ensure_group(stop)
        self.metrics.up.set(1)
        try:
            while not stop.is_set():
                try:
                    now = time.monotonic()
                    if now >= next_claim:
                        next_claim = now + claim_every
                        await self._reclaim(handle)
                    acking = self._unacked
                    entries = await streams.ack_and_read_group(
                        self.lane,
                        self.stream,
                        self.group,
                        self.consumer,
                        acking,
                        count=self.batch_size,
                        block_ms=self.block_ms,
                    )
                    # Only once the pipeline went through: after a failure XACK is simply sent again (idempotent).
                    self._unacked = self._unacked[len(acking) :]
                    if entries:
                        await handle(entries)
                    if time.monotonic() >= next_stats or (until_idle and not entries):
                        await self.flush_acks()
                        next_stats = time.monotonic() + STATS_INTERVAL_S
                        stats = await self._stats()
                        if until_idle and not entries and stats.pending == 0:
                            log.info("no work left; exiting (until-idle)")
                            return
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                        # The stream or group vanished (Redis restarted without persistence, or a flush).
                        self.metrics.redis_errors.labels(op="nogroup").inc()
                        log.warning("consumer group is gone; creating it again: %s", exc)
                        await self._ensure_group(stop)
                        continue
                    self.metrics.redis_errors.labels(op="loop").inc()
                    log.warning("redis error in the consume loop, retrying in %.1fs: %s", backoff, exc)
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            self.metrics.up.set(0)
            await self._final_acks()
            await self.lane.aclose()

    async def flush_acks(self) -> None:
        """Acknowledge every handled entry now."""
        acking = self._unacked
        await streams.ack(self.lane, self.stream, self.group, acking)
        self._unacked = self._unacked[len(acking) :]

    async def _final_acks(self) -> None:
        # On the way out: an entry left unacknowledged is handled again by whoever reclaims it.
        if not self._unacked:
            return
        try:
            async with asyncio.timeout(ACK_FLUSH_TIMEOUT_S):
                await self.flush_acks()
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.redis_errors.labels(op="ack").inc()
            log.warning("could not acknowledge %d handled entries on exit: %s", len(self._unacked), exc)

    async def _ensure_group(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                await streams.ensure_group(self.redis, self.stream, self.group)
                return
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels(op="group_create").inc()
                log.warning("cannot create consumer group yet, retrying in %.1fs: %s", backoff, exc)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _reclaim(self, handle: Handler) -> None:
        entries = await streams.reclaim(
            self.redis,
            self.stream,
            self.group,
            self.consumer,
            min_idle_ms=self.claim_idle_ms,
            count=self.batch_size,
        )
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            log.info("reclaimed %d idle entries", len(entries))
            await handle(entries)

    async def _stats(self) -> streams.GroupStats:
        stats = await streams.group_stats(self.redis, self.stream, self.group)
        if stats.lag is not None:
            self.metrics.stream_lag.set(stats.lag)
        self.metrics.pending.set(stats.pending)
        return stats

    async def dead_letter(self, entry: streams.Entry, *, reason: str, error: str, dead_stream: str) -> None:
        """Move the entry, with the error, to ``dead_stream`` and acknowledge it."""
        await streams.dead_letter(
            self.redis,
            self.stream,
            self.group,
            entry,
            reason=reason,
            error=error,
            consumer=self.consumer,
            dead_stream=dead_stream,
        )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    # A back-off that a stop request cuts short.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
