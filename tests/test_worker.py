"""The ``fama detector`` worker against a real redis-server, in-process and as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.contract.wire import TurnEvent, Verdict, dumps
from detector_service.engine import Engine
from detector_service.metrics import DetectorMetrics
from detector_service.service import serve
from detector_service.settings import DetectorSettings
from detector_service.worker import Worker
from proxy.metrics import ProxyMetrics
from proxy.supervision.verdicts import RedisVerdicts, process_instance_id
from tests.servers import free_port, wait_for_port
from tests.turns import turn

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parent.parent
REPLY = keys.reply_stream("test")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def settings(redis_url: str, **over: Any) -> DetectorSettings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "consumer_name": "w-test",
        "metrics_port": 0,
        "block_ms": 50,
        "claim_idle_ms": 100,
        "profile": "",
    }
    return DetectorSettings(**(base | over))


async def publish_raw(redis: Redis, data: str | None) -> str:
    fields: dict[Any, Any] = {"data": data} if data is not None else {"other": "x"}
    return str(await redis.xadd(keys.TURNS_STREAM, fields))


async def replies(redis: Redis, stream: str = REPLY) -> list[Verdict]:
    return [
        Verdict.model_validate_json(e.data or "")
        for e in await streams.read_replies(redis, stream, "0-0", count=100_000, block_ms=1)
    ]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    return [
        {str(k): str(v) for k, v in (fields or {}).items()}
        for _, fields in (await redis.xrange(keys.TURNS_DEAD_STREAM)) or []
    ]


async def wait_until(check: Callable[[], Awaitable[bool]], within_s: float = 20.0) -> None:
    # Waiting on another process's progress: there is no event to block on across the process boundary.
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


# --- in-process -------------------------------------------------------------------------------------


async def test_until_idle_returns_when_there_is_no_work(redis_url: str, redis: Redis) -> None:
    assert await serve(settings(redis_url), until_idle=True) == 0
    assert await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP) == streams.GroupStats(0, 0)


async def test_verdicts_go_to_each_turns_reply_stream(redis_url: str, redis: Redis) -> None:
    sent = [
        turn(1, reply_to=REPLY),
        turn(2, tool="drop_database", reply_to=REPLY),
        turn(3, reply_to="fama:replies:other"),
    ]
    for t in sent:
        await streams.publish(redis, keys.TURNS_STREAM, dumps(t), maxlen=1000)

    assert await serve(settings(redis_url, reply_ttl_s=60), until_idle=True) == 0

    mine = await replies(redis)
    assert [v.turn_id for v in mine] == [sent[0].turn_id, sent[1].turn_id]
    # The worker answers exactly what the engine says about the turn.
    assert [v.findings for v in mine] == [Engine().evaluate(t).findings for t in sent[:2]]
    assert [v.action for v in mine] == [Engine().evaluate(t).action for t in sent[:2]]
    assert "MTC" in mine[1].categories
    assert {v.worker for v in mine} == {"w-test"}
    assert [v.turn_id for v in await replies(redis, "fama:replies:other")] == [sent[2].turn_id]
    assert 0 < await redis.ttl(REPLY) <= 60
    assert (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending == 0


async def test_malformed_entries_are_dead_lettered_and_the_worker_keeps_going(redis_url: str, redis: Redis) -> None:
    good = [turn(i, reply_to=REPLY) for i in range(3)]
    newer = orjson.loads(dumps(good[0])) | {"v": 99}
    await publish_raw(redis, dumps(good[0]))
    bad_ids = [
        await publish_raw(redis, "{not json"),
        await publish_raw(redis, orjson.dumps(newer).decode()),
    ]
    await publish_raw(redis, dumps(good[1]))
    bad_ids += [
        await publish_raw(redis, None),
        await publish_raw(redis, "[1, 2]"),
        await publish_raw(redis, '{"v": 1, "kind": "turn"}'),
        await publish_raw(redis, dumps(turn(9, reply_to=keys.INTERVENTIONS_STREAM))),
    ]
    await publish_raw(redis, dumps(good[2]))

    assert await serve(settings(redis_url), until_idle=True) == 0

    assert [v.turn_id for v in await replies(redis)] == [t.turn_id for t in good]
    dead = await dead_letters(redis)
    assert [d["source_id"] for d in dead] == bad_ids
    assert [d["reason"] for d in dead] == ["malformed", "version", "malformed", "malformed", "malformed", "malformed"]
    assert dead[0]["data"] == "{not json"
    assert "not JSON" in dead[0]["error"]
    assert '"v":99' in dead[1]["data"]
    assert "unsupported wire schema version 99" in dead[1]["error"]
    assert "no 'data' field" in dead[2]["error"]
    assert "not an object" in dead[3]["error"]
    assert "not a turn event" in dead[4]["error"]
    assert "session_id" in dead[4]["error"]
    assert "is not a reply stream" in dead[5]["error"]
    assert await redis.exists(keys.INTERVENTIONS_STREAM) == 0
    assert (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending == 0


class FailingEngine(Engine):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def evaluate(self, turn: TurnEvent) -> Verdict:
        self.calls += 1
        raise RuntimeError("detector bug")


async def test_a_turn_that_keeps_failing_is_retried_then_dead_lettered(redis_url: str, redis: Redis) -> None:
    await streams.publish(redis, keys.TURNS_STREAM, dumps(turn(1, reply_to=REPLY)), maxlen=1000)
    engine = FailingEngine()
    metrics = DetectorMetrics()
    worker = Worker(settings(redis_url, max_deliveries=2), redis, engine, metrics)

    await worker.run(asyncio.Event(), until_idle=True)

    assert engine.calls == 2  # first delivery, then once more after the reclaim
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "failed"
    assert dead["error"] == "RuntimeError: detector bug"
    assert dead["deliveries"] == "2"
    assert await replies(redis) == []
    assert metrics.registry.get_sample_value("fama_detector_reclaimed_total") == 1
    assert metrics.registry.get_sample_value("fama_detector_dead_letters_total", {"reason": "failed"}) == 1
    assert metrics.registry.get_sample_value("fama_detector_turns_total", {"outcome": "error"}) == 2


async def test_an_entry_delivered_too_often_is_dead_lettered_unevaluated(redis_url: str, redis: Redis) -> None:
    await streams.ensure_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)
    await streams.publish(redis, keys.TURNS_STREAM, dumps(turn(1, reply_to=REPLY)), maxlen=1000)
    # Three consumers took it in turn and died before acknowledging it.
    await streams.read_group(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "ghost-1", count=1, block_ms=1)
    await streams.reclaim(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "ghost-2", min_idle_ms=0, count=1)
    await streams.reclaim(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP, "ghost-3", min_idle_ms=0, count=1)
    engine = FailingEngine()

    await Worker(settings(redis_url, max_deliveries=3), redis, engine, DetectorMetrics()).run(
        asyncio.Event(), until_idle=True
    )

    assert engine.calls == 0
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "max_deliveries"
    assert dead["deliveries"] == "4"
    assert "delivered 4 times" in dead["error"]


async def test_worker_recreates_a_vanished_group(redis_url: str, redis: Redis) -> None:
    stop = asyncio.Event()
    worker = asyncio.create_task(serve(settings(redis_url), stop=stop))
    source = RedisVerdicts(redis, process_instance_id("proxy"), ProxyMetrics())
    await source.start()
    try:
        assert (await source.evaluate(turn(1), timeout_s=10)).verdict is not None
        await redis.delete(keys.TURNS_STREAM)  # the group goes with the stream, as after a Redis restart
        assert (await source.evaluate(turn(2), timeout_s=10)).verdict is not None
    finally:
        await source.stop()
        stop.set()
        assert await worker == 0


async def test_health_ready_and_metrics_endpoints(redis_url: str, redis: Redis) -> None:
    port = free_port()
    stop = asyncio.Event()
    sent = turn(1, tool="nope", reply_to=REPLY)
    expected = Engine().evaluate(sent)
    await streams.publish(redis, keys.TURNS_STREAM, dumps(sent), maxlen=1000)
    task = asyncio.create_task(serve(settings(redis_url, metrics_port=port, metrics_host="127.0.0.1"), stop=stop))
    await asyncio.to_thread(wait_for_port, port)
    await wait_until(lambda: _has_replies(redis, 1))
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        text = (await client.get("/metrics")).text
    assert 'fama_detector_turns_total{outcome="ok"} 1.0' in text
    assert 'fama_detector_findings_total{category="MTC",' in text
    assert f'fama_detector_verdicts_total{{action="{expected.action.value}"}} 1.0' in text
    assert "fama_detector_up 1.0" in text
    stop.set()
    assert await task == 0


async def test_readyz_fails_while_redis_is_unreachable() -> None:
    port = free_port()
    stop = asyncio.Event()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    task = asyncio.create_task(serve(settings(dead_redis, metrics_port=port, metrics_host="127.0.0.1"), stop=stop))
    await asyncio.to_thread(wait_for_port, port)
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    stop.set()
    assert await task == 0


async def _has_replies(redis: Redis, n: int, stream: str = REPLY) -> bool:
    return int(await redis.xlen(stream)) >= n


# --- real processes running ``fama detector`` --------------------------------------------------------


def start_worker(redis_url: str, name: str, log_dir: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    environ = os.environ | {
        "FAMA_REDIS_URL": redis_url,
        "FAMA_CONSUMER_NAME": name,
        "FAMA_METRICS_PORT": "0",
        "FAMA_BLOCK_MS": "100",
        "FAMA_PROFILE": "",
    }
    environ |= {f"FAMA_{k.upper()}": v for k, v in env.items()}
    with (log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-c", "from proxy.cli import main; main()", "detector", *args],
            cwd=REPO,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def blocked_readers(redis: Redis) -> int:
    """Clients blocked in XREADGROUP right now (Redis 7.0 registers a consumer only once it gets an entry)."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in str(c.get("flags")))


async def test_three_workers_share_the_stream_one_verdict_per_turn(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    names = ["w0", "w1", "w2"]
    procs = [start_worker(redis_url, n, tmp_path) for n in names]
    source = RedisVerdicts(redis, process_instance_id("proxy"), ProxyMetrics())
    try:
        # All three block in XREADGROUP before the first turn, so Redis hands the first turns to each in turn.
        await wait_until(lambda: _readers_blocked(redis, 3))
        await source.start()
        turns = [turn(i, tool="nope" if i % 5 == 0 else "get_order_details") for i in range(90)]
        outcomes = await asyncio.gather(*(source.evaluate(t, timeout_s=30) for t in turns))

        assert all(o.verdict is not None for o in outcomes), [o.reason for o in outcomes]
        verdicts = [o.verdict for o in outcomes if o.verdict is not None]
        assert [v.turn_id for v in verdicts] == [t.turn_id for t in turns]
        assert [v.findings for v in verdicts] == [Engine().evaluate(t).findings for t in turns]
        assert all("MTC" in v.categories for v in verdicts[::5])
        assert {v.worker for v in verdicts} == set(names)
        assert int(await redis.xlen(source.reply_stream)) == 90  # exactly one verdict per turn
        assert source.metrics.registry.get_sample_value("fama_late_verdicts_total") == 0

        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 15) for p in procs]
        assert codes == [0, 0, 0]
        assert (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending == 0
    finally:
        await source.stop()
        stop_all(procs)


async def _readers_blocked(redis: Redis, n: int) -> bool:
    return await blocked_readers(redis) == n


async def test_killed_worker_entries_are_reclaimed_exactly_one_verdict_each(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    # Worker "stuck" may read but not publish or acknowledge (an ACL denies XADD/XACK), so the turns it
    # takes stay pending in its name, exactly as if it had died mid-batch. Then it is SIGKILLed.
    await redis.acl_setuser(
        "stuck",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=["-xadd", "-xack"],
    )
    stuck_url = redis_url.replace("redis://", "redis://stuck:pw@")
    source = RedisVerdicts(redis, process_instance_id("proxy"), ProxyMetrics())
    await source.start()
    turns = [turn(i) for i in range(10)]
    waiting = [asyncio.create_task(source.evaluate(t, timeout_s=60)) for t in turns]
    procs = [start_worker(stuck_url, "stuck", tmp_path)]
    try:
        await wait_until(lambda: _pending_for(redis, "stuck", len(turns)))
        procs[0].send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(procs[0].wait, 10) == -signal.SIGKILL
        assert not any(w.done() for w in waiting)

        procs.append(start_worker(redis_url, "rescuer", tmp_path, "--until-idle", claim_idle_ms="200"))
        outcomes = await asyncio.gather(*waiting)
        assert await asyncio.to_thread(procs[1].wait, 30) == 0

        verdicts = [o.verdict for o in outcomes if o.verdict is not None]
        assert [v.turn_id for v in verdicts] == [t.turn_id for t in turns]
        assert {v.worker for v in verdicts} == {"rescuer"}
        assert int(await redis.xlen(source.reply_stream)) == len(turns)
        assert source.metrics.registry.get_sample_value("fama_late_verdicts_total") == 0
        assert (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending == 0
        assert "reclaimed 10 idle entries" in (tmp_path / "rescuer.log").read_text()
    finally:
        await source.stop()
        stop_all(procs)
        await redis.acl_deluser("stuck")


async def _pending_for(redis: Redis, consumer: str, n: int) -> bool:
    try:
        rows = await redis.xpending_range(keys.TURNS_STREAM, keys.DETECTOR_GROUP, "-", "+", n + 1, consumer)
    except Exception:  # the group does not exist yet
        return False
    return len(rows) == n


async def test_sigterm_drains_in_flight_work_and_exits_zero(redis_url: str, redis: Redis, tmp_path: Path) -> None:
    total = 20_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(total):
            pipe.xadd(keys.TURNS_STREAM, {"data": dumps(turn(i, reply_to=REPLY))})
        await pipe.execute()
    proc = start_worker(redis_url, "drainer", tmp_path, drain_timeout_s="5", batch_size="64")
    try:
        # Block (no polling) until the worker has published its first verdict: it is now mid-stream.
        first = await streams.read_replies(redis, REPLY, "0-0", count=1, block_ms=30_000)
        assert first
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 10)
        took = time.monotonic() - started
    finally:
        stop_all([proc])

    assert code == 0
    assert took < 5
    (group,) = await redis.xinfo_groups(keys.TURNS_STREAM)
    assert group["pending"] == 0  # everything it read was finished and acknowledged
    assert group["lag"] > 0  # and it stopped reading: the rest is left for other replicas
    published = await replies(redis)
    assert len(published) == group["entries-read"]
    assert len({v.turn_id for v in published}) == len(published)
