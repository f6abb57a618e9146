"""Session and intervention recording: Redis (real redis-server) and the bounded in-memory recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from detector_service.bus import keys
from detector_service.bus.client import PROXY, redis_client
from detector_service.contract.wire import Action, Category, Finding, TurnEvent, Verdict
from proxy.metrics import ProxyMetrics
from proxy.supervision.recorder import Intervention, MemoryRecorder, Recorder, RedisRecorder, recorder_for
from proxy.supervision.verdicts import REPLY_BLOCK_MS
from tests.servers import RedisServer
from tests.turns import turn


def second_turn(first: TurnEvent) -> TurnEvent:
    """The next decision in the same session: the first candidate was answered by a tool."""
    tool_output = {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "delivered"}'}
    return TurnEvent(
        session_id=first.session_id,
        tenant=first.tenant,
        messages=[*first.messages, first.candidate, tool_output],
        tools=first.tools,
        candidate={"role": "assistant", "content": "Your order was delivered."},
    )


def intervention(t: TurnEvent, **over: Any) -> Intervention:
    base: dict[str, Any] = {
        "tenant": t.tenant,
        "session_id": t.session_id,
        "turn_id": t.turn_id,
        "action": Action.RETRY,
        "categories": [Category.MTC],
        "original": t.candidate,
        "final": {"role": "assistant", "content": "Let me look that up."},
        "message": "Tool 'drop_database' does not exist.",
    }
    return Intervention(**(base | over))


def verdict_for(t: TurnEvent) -> Verdict:
    return Verdict(
        turn_id=t.turn_id,
        session_id=t.session_id,
        tenant=t.tenant,
        action=Action.RETRY,
        findings=[Finding(category=Category.MTC, detector="unknown_tool", message="unknown tool")],
    )


async def record_a_session(recorder: Recorder) -> tuple[TurnEvent, TurnEvent]:
    first = turn(1, tool="drop_database")
    recorder.record_turn(first)
    recorder.record_verdict(verdict_for(first))
    recorder.record_intervention(intervention(first))
    second = second_turn(first)
    recorder.record_turn(second)
    await recorder.flush()
    return first, second


async def check_the_session(recorder: Recorder, first: TurnEvent, second: TurnEvent) -> None:
    entries = await recorder.session("t1", "s1")
    assert [(e.kind, e.turn_id) for e in entries] == [
        ("turn", first.turn_id),
        ("verdict", first.turn_id),
        ("intervention", first.turn_id),
        ("turn", second.turn_id),
    ]
    assert entries[0].data["new_messages"] == first.messages
    assert entries[0].data["tools"] == first.tools
    assert entries[0].data["candidate"] == first.candidate
    assert entries[1].data["action"] == "retry"
    assert entries[1].data["findings"][0]["detector"] == "unknown_tool"
    assert entries[2].data["original"] == first.candidate
    assert entries[2].data["final"] == {"role": "assistant", "content": "Let me look that up."}
    # Only what is new since the previous assistant message: the record grows linearly.
    assert entries[3].data["new_messages"] == [second.messages[-1]]
    assert "tools" not in entries[3].data
    assert entries[3].data["message_count"] == 4
    assert await recorder.session("t1", "other") == []

    (latest,) = await recorder.interventions()
    assert latest.turn_id == first.turn_id
    assert latest.categories == [Category.MTC]
    assert latest.action is Action.RETRY
    assert latest.original == first.candidate


# --- Redis ------------------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client(redis_url, PROXY, block_ms=REPLY_BLOCK_MS)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def recorder(redis: Redis) -> AsyncIterator[RedisRecorder]:
    rec = RedisRecorder(redis, ProxyMetrics(), session_ttl_s=600)
    await rec.start()
    try:
        yield rec
    finally:
        await rec.stop()


@pytest.mark.redis
async def test_redis_records_the_session_and_the_intervention_log(redis: Redis, recorder: RedisRecorder) -> None:
    first, second = await record_a_session(recorder)
    await check_the_session(recorder, first, second)
    assert 0 < await redis.ttl(keys.session_key("t1", "s1")) <= 600
    assert await redis.xlen(keys.INTERVENTIONS_STREAM) == 1


@pytest.mark.redis
async def test_redis_ttl_is_refreshed_on_write(redis: Redis, recorder: RedisRecorder) -> None:
    key = keys.session_key("t1", "s1")
    recorder.record_turn(turn(1))
    await recorder.flush()
    await redis.expire(key, 5)
    recorder.record_turn(turn(2))
    await recorder.flush()
    assert await redis.ttl(key) > 5


@pytest.mark.redis
async def test_redis_session_record_is_capped(redis: Redis) -> None:
    rec = RedisRecorder(redis, ProxyMetrics(), max_session_entries=3)
    await rec.start()
    turns = [turn(i) for i in range(5)]
    for t in turns:
        rec.record_turn(t)
    await rec.stop()
    assert [e.turn_id for e in await rec.session("t1", "s1")] == [t.turn_id for t in turns[2:]]


@pytest.mark.redis
async def test_redis_interventions_newest_first_with_limit(recorder: RedisRecorder) -> None:
    turns = [turn(i) for i in range(4)]
    for t in turns:
        recorder.record_intervention(intervention(t))
    await recorder.flush()
    assert [i.turn_id for i in await recorder.interventions(limit=2)] == [turns[3].turn_id, turns[2].turn_id]


@pytest.mark.redis
async def test_stop_writes_what_is_queued(redis: Redis) -> None:
    rec = RedisRecorder(redis, ProxyMetrics())
    await rec.start()
    rec.record_turn(turn(1))
    rec.record_turn(turn(2))
    await rec.stop()
    assert await redis.llen(keys.session_key("t1", "s1")) == 2


async def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    metrics = ProxyMetrics()
    rec = RedisRecorder(Redis.from_url("redis://127.0.0.1:1/0"), metrics, queue_size=2)  # never started
    for i in range(5):
        rec.record_turn(turn(i))
    assert rec.dropped == 3
    assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "record_queue_full"}) == 3
    await rec.redis.aclose()


@pytest.mark.redis
async def test_redis_failures_are_counted_never_raised() -> None:
    server = RedisServer()
    client = redis_client(server.url, PROXY, block_ms=REPLY_BLOCK_MS)
    metrics = ProxyMetrics()
    rec = RedisRecorder(client, metrics)
    await rec.start()
    try:
        server.stop()
        rec.record_turn(turn(1))
        rec.record_intervention(intervention(turn(1)))
        await rec.flush()
        assert (metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "record"}) or 0) >= 1
        rec.record_turn(turn(2))  # the writer survived the failure and keeps accepting records
        await rec.flush()
        assert (metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "record"}) or 0) >= 2
    finally:
        await rec.stop()
        await client.aclose()


# --- in memory --------------------------------------------------------------------------------------


async def test_memory_recorder_keeps_the_same_records() -> None:
    rec = recorder_for(None, ProxyMetrics(), session_ttl_s=600)
    assert isinstance(rec, MemoryRecorder)
    first, second = await record_a_session(rec)
    await check_the_session(rec, first, second)


async def test_memory_recorder_is_bounded() -> None:
    rec = MemoryRecorder(max_sessions=2, max_session_entries=2, max_interventions=2)
    for s in ("a", "b", "c"):
        for i in range(3):
            rec.record_turn(turn(i, session=s))
    assert await rec.session("t1", "a") == []  # least recently written session evicted
    assert len(await rec.session("t1", "c")) == 2
    for i in range(3):
        rec.record_intervention(intervention(turn(i)))
    assert len(await rec.interventions()) == 2


async def test_memory_recorder_expires_idle_sessions() -> None:
    now = [1000.0]
    rec = MemoryRecorder(session_ttl_s=60, clock=lambda: now[0])
    rec.record_turn(turn(1, session="old"))
    now[0] += 30
    rec.record_turn(turn(2, session="new"))
    now[0] += 45
    assert await rec.session("t1", "old") == []
    assert len(await rec.session("t1", "new")) == 1
