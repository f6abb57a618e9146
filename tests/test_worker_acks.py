"""Acknowledgements ride with the next read: a published turn is acknowledged, an unpublished one never is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.contract.wire import TurnEvent, dumps
from detector_service.engine import Engine
from detector_service.metrics import DetectorMetrics
from detector_service.settings import DetectorSettings
from detector_service.worker import Worker
from tests.test_worker import wait_until
from tests.turns import turn

pytestmark = pytest.mark.redis

REPLY = keys.reply_stream("acks")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _pending(redis: Redis) -> int:
    return (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending


async def test_ack_and_read_group_acknowledges_then_reads_the_next_entries(redis: Redis) -> None:
    await streams.ensure_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)
    first = await streams.publish(redis, keys.TURNS_STREAM, "one", maxlen=100)
    [read] = await streams.read_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "c", count=10, block_ms=10)
    assert (read.id, await _pending(redis)) == (first, 1)
    second = await streams.publish(redis, keys.TURNS_STREAM, "two", maxlen=100)

    entries = await streams.ack_and_read_group(
        redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "c", [first], count=10, block_ms=10
    )

    assert [(e.id, e.data) for e in entries] == [(second, "two")]
    rows = await redis.xpending_range(keys.TURNS_STREAM, keys.DETECTOR_GROUP, "-", "+", 10)
    assert [r["message_id"] for r in rows] == [second]  # the first is acknowledged, the one just read is not


async def test_a_running_worker_leaves_nothing_pending_once_its_verdicts_are_out(redis: Redis, redis_url: str) -> None:
    settings = DetectorSettings(redis_url=redis_url, consumer_name="w-acks", metrics_port=0, block_ms=50, profile="")
    worker = Worker(settings, redis, Engine(), DetectorMetrics())
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        events: list[TurnEvent] = [turn(i, reply_to=REPLY) for i in range(3)]
        for event in events:
            await streams.publish(redis, keys.TURNS_STREAM, dumps(event), maxlen=100)

        async def answered_and_acknowledged() -> bool:
            return await redis.xlen(REPLY) == len(events) and await _pending(redis) == 0

        await wait_until(answered_and_acknowledged)
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
    assert worker.processed == len(events)


async def test_a_stopping_worker_acknowledges_what_it_published(redis: Redis, redis_url: str) -> None:
    settings = DetectorSettings(redis_url=redis_url, consumer_name="w-stop", metrics_port=0, block_ms=50, profile="")
    worker = Worker(settings, redis, Engine(), DetectorMetrics())
    await streams.ensure_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)
    await streams.publish(redis, keys.TURNS_STREAM, dumps(turn(1, reply_to=REPLY)), maxlen=100)
    entries = await streams.read_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "w-stop", count=10, block_ms=10)
    await worker.handle(entries)
    assert (await redis.xlen(REPLY), await _pending(redis)) == (1, 1)  # published, acknowledgement queued

    stop = asyncio.Event()
    stop.set()
    await worker.run(stop)  # stops at once; on its way out it sends the queued acknowledgement

    assert await _pending(redis) == 0


async def test_publish_replies_refreshes_expiry_only_of_the_streams_named(redis: Redis) -> None:
    ok = await streams.publish_replies(
        redis, [("fama:replies:a", "v1"), ("fama:replies:b", "v2")], maxlen=100, ttl_s=30, expire={"fama:replies:b"}
    )
    assert ok == [True, True]
    assert (await redis.ttl("fama:replies:a"), 0 < await redis.ttl("fama:replies:b") <= 30) == (-1, True)


async def test_the_worker_sets_a_reply_streams_expiry_once_per_refresh_period(redis: Redis, redis_url: str) -> None:
    settings = DetectorSettings(redis_url=redis_url, consumer_name="w-ttl", metrics_port=0, reply_ttl_s=60, profile="")
    worker = Worker(settings, redis, Engine(), DetectorMetrics())
    await streams.ensure_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)

    async def one_turn(n: int) -> None:
        await streams.publish(redis, keys.TURNS_STREAM, dumps(turn(n, reply_to=REPLY)), maxlen=100)
        entries = await streams.read_group(
            redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "w-ttl", count=10, block_ms=10
        )
        await worker.handle(entries)

    await one_turn(1)
    assert 0 < await redis.ttl(REPLY) <= 60
    await redis.persist(REPLY)
    await one_turn(2)  # within a quarter of the TTL of the last refresh: the verdict goes out alone
    assert (await redis.xlen(REPLY), await redis.ttl(REPLY)) == (2, -1)
