"""Redis Streams mechanics against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from detector_service.bus import keys, streams

pytestmark = pytest.mark.redis

STREAM = keys.TURNS_STREAM
GROUP = keys.DETECTOR_GROUP


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _fields(redis: Redis, stream: str, *, last: bool = False) -> dict[str, str]:
    rows = await (redis.xrevrange(stream, count=1) if last else redis.xrange(stream, count=1))
    assert rows
    fields = rows[0][1]
    assert fields is not None
    return {str(k): str(v) for k, v in fields.items()}


async def test_publish_caps_the_stream_approximately(redis: Redis) -> None:
    for i in range(2000):
        await streams.publish(redis, STREAM, f'{{"n": {i}}}', maxlen=100)
    length = await redis.xlen(STREAM)
    assert 100 <= length < 2000
    assert await _fields(redis, STREAM, last=True) == {"data": '{"n": 1999}'}


async def test_group_creation_is_idempotent_and_only_busygroup_is_ignored(redis: Redis) -> None:
    assert await streams.ensure_group(redis, STREAM, GROUP) is True
    assert await streams.ensure_group(redis, STREAM, GROUP) is False
    await redis.set("not-a-stream", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await streams.ensure_group(redis, "not-a-stream", GROUP)


async def test_read_ack_and_group_stats(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    for i in range(5):
        await streams.publish(redis, STREAM, str(i), maxlen=1000)
    assert await streams.group_stats(redis, STREAM, GROUP) == streams.GroupStats(lag=5, pending=0)

    got = await streams.read_group(redis, STREAM, GROUP, "c1", count=3, block_ms=10)
    assert [e.data for e in got] == ["0", "1", "2"]
    assert all(e.deliveries == 1 for e in got)
    assert await streams.group_stats(redis, STREAM, GROUP) == streams.GroupStats(lag=2, pending=3)

    assert await streams.ack(redis, STREAM, GROUP, [e.id for e in got[:2]]) == 2
    assert await streams.group_stats(redis, STREAM, GROUP) == streams.GroupStats(lag=2, pending=1)
    assert await streams.ack(redis, STREAM, GROUP, []) == 0


async def test_read_blocks_then_returns_nothing(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    assert await streams.read_group(redis, STREAM, GROUP, "c1", count=10, block_ms=20) == []


async def test_entry_without_data_field_reads_as_none(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    await redis.xadd(STREAM, {"other": "x"})
    (entry,) = await streams.read_group(redis, STREAM, GROUP, "c1", count=10, block_ms=10)
    assert entry.data is None


async def test_reclaim_takes_idle_entries_and_counts_deliveries(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    for i in range(3):
        await streams.publish(redis, STREAM, str(i), maxlen=1000)
    first = await streams.read_group(redis, STREAM, GROUP, "crashed", count=10, block_ms=10)
    assert len(first) == 3

    # Nothing is idle long enough yet.
    assert await streams.reclaim(redis, STREAM, GROUP, "live", min_idle_ms=60_000, count=10) == []

    claimed = await streams.reclaim(redis, STREAM, GROUP, "live", min_idle_ms=0, count=10)
    assert [e.data for e in claimed] == ["0", "1", "2"]
    assert [e.deliveries for e in claimed] == [2, 2, 2]
    again = await streams.reclaim(redis, STREAM, GROUP, "other", min_idle_ms=0, count=10)
    assert [e.deliveries for e in again] == [3, 3, 3]
    pending = await redis.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert {p["consumer"] for p in pending} == {"other"}


async def test_dead_letter_keeps_data_and_error_then_acks(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    await streams.publish(redis, STREAM, "{not json", maxlen=1000)
    (entry,) = await streams.read_group(redis, STREAM, GROUP, "c1", count=10, block_ms=10)

    await streams.dead_letter(redis, STREAM, GROUP, entry, reason="malformed", error="data is not JSON", consumer="c1")

    fields = await _fields(redis, keys.TURNS_DEAD_STREAM)
    assert fields["data"] == "{not json"
    assert fields["error"] == "data is not JSON"
    assert fields["reason"] == "malformed"
    assert fields["source_id"] == entry.id
    assert fields["deliveries"] == "1"
    assert (await streams.group_stats(redis, STREAM, GROUP)).pending == 0


async def test_publish_replies_sets_expiry_and_reports_failures(redis: Redis) -> None:
    await redis.set("fama:replies:broken", "not a stream")
    ok = await streams.publish_replies(
        redis,
        [("fama:replies:a", "v1"), ("fama:replies:broken", "v2"), ("fama:replies:a", "v3")],
        maxlen=100,
        ttl_s=30,
    )
    assert ok == [True, False, True]
    assert 0 < await redis.ttl("fama:replies:a") <= 30
    got = await streams.read_replies(redis, "fama:replies:a", "0-0", count=10, block_ms=10)
    assert [e.data for e in got] == ["v1", "v3"]
    after = await streams.read_replies(redis, "fama:replies:a", got[-1].id, count=10, block_ms=10)
    assert after == []


async def test_group_stats_for_missing_group(redis: Redis) -> None:
    await streams.ensure_group(redis, STREAM, GROUP)
    assert await streams.group_stats(redis, STREAM, "nobody") == streams.GroupStats(lag=None, pending=0)


async def test_a_lane_answers_error_replies_in_place_and_stays_in_step(redis: Redis) -> None:
    await redis.set("not-a-stream", "x")
    lane = streams.Lane(redis)
    try:
        ok, refused, value = await lane.send(
            ("SET", "k", "v"), ("XADD", "not-a-stream", "*", "data", "d"), ("GET", "k")
        )
        assert (ok, value) == ("OK", "v")
        assert isinstance(refused, ResponseError)
        assert "WRONGTYPE" in str(refused)
        # The next exchange reads its own replies, not leftovers of the last one.
        assert await lane.send(("GET", "not-a-stream")) == ["x"]
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await streams.read_replies(lane, "not-a-stream", "0-0", count=1, block_ms=1)
    finally:
        await lane.aclose()


async def test_a_lane_keeps_one_connection_and_reconnects_when_it_is_killed(redis: Redis, redis_url: str) -> None:
    # As the proxy's client: one immediate retry, for a pooled connection gone stale.
    client = Redis.from_url(redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1))
    lane = streams.Lane(client)
    try:
        [first] = await lane.send(("CLIENT", "ID"))
        assert await lane.send(("CLIENT", "ID")) == [first]
        assert await redis.client_kill_filter(_id=first) == 1
        # The client's retry policy applies: the dead connection is dropped and the command sent on a new one.
        await streams.publish(lane, STREAM, "after the kill", maxlen=100)
        [second] = await lane.send(("CLIENT", "ID"))
        assert second != first
        assert await _fields(redis, STREAM, last=True) == {"data": "after the kill"}
    finally:
        await lane.aclose()
        await client.aclose()


async def test_lanes_serve_concurrent_exchanges_and_survive_a_cancelled_one(redis: Redis) -> None:
    lanes = streams.Lanes(redis)
    try:
        # Two at once: the second cannot wait behind the first one's blocking read, so it gets a lane of its own.
        blocked = asyncio.create_task(streams.read_replies(lanes, "fama:replies:a", "$", count=1, block_ms=5_000))
        await asyncio.sleep(0.05)
        assert await streams.publish(lanes, "fama:replies:a", "v1", maxlen=100)
        (entry,) = await blocked
        assert entry.data == "v1"
        # A cancelled exchange drops its connection; the lane it ran on reconnects for the next one.
        stuck = asyncio.create_task(streams.call(lanes, "BLPOP", "nothing", 5))
        await asyncio.sleep(0.05)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert [await streams.call(lanes, "ECHO", str(n)) for n in range(3)] == ["0", "1", "2"]
    finally:
        await lanes.aclose()


async def test_a_lane_bounds_an_exchange_by_the_clients_socket_timeout(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)
    lane = streams.Lane(client)
    try:
        with pytest.raises(RedisTimeoutError):
            await lane.send(("BLPOP", "nothing", 2))
        assert await lane.send(("ECHO", "after")) == ["after"]
    finally:
        await lane.aclose()
        await client.aclose()
