"""The proxy's verdict sources: embedded engine, and Redis against a real redis-server and worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.bus.client import PROXY, redis_client
from detector_service.contract.profile import JudgeConfig
from detector_service.contract.wire import Finding, TurnEvent, Verdict, dumps, now_ms
from detector_service.engine import Engine
from detector_service.llm.judge import Judge, make_client
from detector_service.service import serve
from detector_service.settings import DetectorSettings
from proxy.metrics import ProxyMetrics
from proxy.supervision.verdicts import (
    REPLY_BLOCK_MS,
    EmbeddedVerdicts,
    MissReason,
    RedisVerdicts,
    process_instance_id,
    verdict_source,
)
from tests.scripted_llm import ScriptedLLM
from tests.servers import RedisServer
from tests.turns import turn, unconfirmed_cancel


class FailingEngine(Engine):
    def evaluate(self, turn: TurnEvent) -> Verdict:
        raise RuntimeError("detector bug")


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- embedded ---------------------------------------------------------------------------------------


async def test_embedded_returns_the_engines_verdict() -> None:
    metrics = ProxyMetrics()
    source = verdict_source(None, Engine(), "host", metrics)
    assert isinstance(source, EmbeddedVerdicts)
    t = turn(1, tool="drop_database")

    outcome = await source.evaluate(t, timeout_s=0.25)

    assert outcome.verdict is not None
    assert outcome.reason is None
    assert outcome.verdict.turn_id == t.turn_id
    assert "MTC" in outcome.verdict.categories
    assert outcome.transport == "embedded"
    assert sample(metrics, "fama_verdict_wait_seconds_count", transport="embedded") == 1


async def test_embedded_detector_failure_is_an_outage_not_an_exception() -> None:
    outcome = await EmbeddedVerdicts(FailingEngine()).evaluate(turn(1), timeout_s=0.25)
    assert outcome.verdict is None
    assert outcome.reason is MissReason.OUTAGE


class CrashingJudge(Judge):
    async def findings(self, turn: TurnEvent) -> list[Finding]:
        raise RuntimeError("judge bug")


@pytest.mark.parametrize("failure", ["status 500", "crash"])
async def test_an_embedded_judge_failure_leaves_the_deterministic_verdict(failure: str) -> None:
    llm = ScriptedLLM()
    llm.status = 500
    metrics = ProxyMetrics()
    with llm.serving() as url:
        config = JudgeConfig(enabled=True, base_url=url, model="judge-model", timeout_s=5)
        kind = CrashingJudge if failure == "crash" else Judge
        source = EmbeddedVerdicts(Engine(), metrics, kind(config, make_client(config, None)))
        event = unconfirmed_cancel()
        outcome = await source.evaluate(event, timeout_s=5)
        await source.stop()
    assert outcome.verdict is not None
    deterministic = Engine().evaluate(event)
    assert (outcome.verdict.action, outcome.verdict.findings) == (deterministic.action, deterministic.findings)
    assert outcome.verdict.findings  # the unconfirmed cancel is still caught
    assert sample(metrics, "fama_judge_calls_total", outcome="error") == 1
    assert len(llm.requests) == (1 if failure == "status 500" else 0)


# --- Redis ------------------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client(redis_url, PROXY, block_ms=REPLY_BLOCK_MS)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def source(redis: Redis) -> AsyncIterator[RedisVerdicts]:
    src = RedisVerdicts(redis, process_instance_id("proxy"), ProxyMetrics())
    await src.start()
    try:
        yield src
    finally:
        await src.stop()


def worker_settings(redis_url: str, **over: Any) -> DetectorSettings:
    base: dict[str, Any] = {"redis_url": redis_url, "consumer_name": "w", "metrics_port": 0, "block_ms": 20}
    return DetectorSettings(**(base | over))


async def next_turn(redis: Redis, after: str = "0-0") -> tuple[str, TurnEvent]:
    """Block until a turn is published after ``after``; return its entry id and the event."""
    (entry,) = await streams.read_replies(redis, keys.TURNS_STREAM, after, count=1, block_ms=10_000)
    return entry.id, TurnEvent.model_validate_json(entry.data or "")


@pytest.mark.redis
async def test_verdict_is_delivered(redis_url: str, redis: Redis, source: RedisVerdicts) -> None:
    stop = asyncio.Event()
    worker = asyncio.create_task(serve(worker_settings(redis_url), stop=stop))
    t = turn(7, tool="drop_database")
    try:
        outcome = await source.evaluate(t, timeout_s=10)
    finally:
        stop.set()
        assert await worker == 0

    assert outcome.verdict is not None
    assert outcome.verdict.turn_id == t.turn_id
    assert outcome.verdict.worker == "w"
    assert outcome.verdict.findings == Engine().evaluate(t).findings
    assert "MTC" in outcome.verdict.categories
    assert outcome.transport == "redis"
    assert outcome.waited_s < 10
    _, sent = await next_turn(redis)
    assert sent.reply_to == source.reply_stream
    assert sent.deadline_ms is not None
    assert sent.created_ms <= sent.deadline_ms <= now_ms() + 10_000
    # The wire payload is exactly what ``dumps`` writes for the turn with its address.
    (entry,) = await streams.read_replies(redis, keys.TURNS_STREAM, "0-0", count=1, block_ms=1)
    assert entry.data == dumps(t.model_copy(update={"reply_to": sent.reply_to, "deadline_ms": sent.deadline_ms}))
    assert sample(source.metrics, "fama_verdict_wait_seconds_count", transport="redis") == 1
    assert sample(source.metrics, "fama_verdict_deadline_misses_total", transport="redis") == 0


@pytest.mark.redis
async def test_deadline_is_respected_when_no_worker_runs(source: RedisVerdicts) -> None:
    started = time.monotonic()
    outcome = await source.evaluate(turn(1), timeout_s=0.2)
    elapsed = time.monotonic() - started

    assert outcome.verdict is None
    assert outcome.reason is MissReason.DEADLINE
    assert 0.2 <= elapsed < 2.0  # the deadline, not a hang (room for a busy host)
    assert sample(source.metrics, "fama_verdict_deadline_misses_total", transport="redis") == 1
    assert (await source.evaluate(turn(2), timeout_s=0)).reason is MissReason.DEADLINE


@pytest.mark.redis
async def test_late_verdict_is_recorded_and_counted_not_applied(
    redis_url: str, redis: Redis, source: RedisVerdicts
) -> None:
    t = turn(3)
    outcome = await source.evaluate(t, timeout_s=0.05)
    assert outcome.reason is MissReason.DEADLINE

    # A worker picks the turn up only now, long after its deadline.
    assert await serve(worker_settings(redis_url), until_idle=True) == 0

    (late,) = await streams.read_replies(redis, keys.LATE_VERDICTS_STREAM, "0-0", count=10, block_ms=10_000)
    assert Verdict.model_validate_json(late.data or "").turn_id == t.turn_id
    assert sample(source.metrics, "fama_late_verdicts_total") == 1
    assert outcome.verdict is None


@pytest.mark.redis
async def test_duplicate_verdict_is_dropped(redis: Redis, source: RedisVerdicts) -> None:
    first = asyncio.create_task(source.evaluate(turn(1), timeout_s=10))
    entry_id, sent = await next_turn(redis)
    verdict = dumps(Verdict(turn_id=sent.turn_id, session_id=sent.session_id, worker="a"))
    await streams.publish(redis, source.reply_stream, verdict, maxlen=100)
    await streams.publish(redis, source.reply_stream, verdict, maxlen=100)  # e.g. a reclaimed, re-evaluated turn
    assert (await first).verdict is not None

    # A later turn answered after the duplicate proves the reader has gone past it.
    second = asyncio.create_task(source.evaluate(turn(2), timeout_s=10))
    _, sent2 = await next_turn(redis, after=entry_id)
    await streams.publish(
        redis, source.reply_stream, dumps(Verdict(turn_id=sent2.turn_id, session_id=sent2.session_id)), maxlen=100
    )
    assert (await second).verdict is not None
    assert sample(source.metrics, "fama_late_verdicts_total") == 0
    assert await redis.exists(keys.LATE_VERDICTS_STREAM) == 0


@pytest.mark.redis
async def test_the_same_turn_id_cannot_wait_twice(redis: Redis, source: RedisVerdicts) -> None:
    t = turn(1)
    waiting = asyncio.create_task(source.evaluate(t, timeout_s=0.5))
    await next_turn(redis)
    with pytest.raises(ValueError, match="already waiting"):
        await source.evaluate(t, timeout_s=0.5)
    assert (await waiting).reason is MissReason.DEADLINE


@pytest.mark.redis
async def test_stop_releases_waiting_turns(redis: Redis) -> None:
    src = RedisVerdicts(redis, process_instance_id("proxy"), ProxyMetrics())
    await src.start()
    waiting = asyncio.create_task(src.evaluate(turn(1), timeout_s=30))
    await next_turn(redis)
    await src.stop()
    outcome = await waiting
    assert outcome.reason is MissReason.OUTAGE
    assert outcome.waited_s < 5


@pytest.mark.redis
async def test_redis_outage_gives_a_quick_outage_outcome_never_an_exception() -> None:
    server = RedisServer()
    client = redis_client(server.url, PROXY, block_ms=REPLY_BLOCK_MS)
    src = RedisVerdicts(client, process_instance_id("proxy"), ProxyMetrics())
    await src.start()
    try:
        waiting = asyncio.create_task(src.evaluate(turn(1), timeout_s=30))
        await next_turn(client)
        server.stop()

        outcome = await waiting
        assert outcome.reason is MissReason.OUTAGE
        assert outcome.waited_s < 5  # released when the reader lost Redis, not at the 30 s deadline

        started = time.monotonic()
        later = await src.evaluate(turn(2), timeout_s=30)
        assert later.reason is MissReason.OUTAGE
        assert time.monotonic() - started < 1.5
        assert sample(src.metrics, "fama_redis_errors_total", op="read_replies") >= 1
    finally:
        await src.stop()
        await client.aclose()
        server.stop()
