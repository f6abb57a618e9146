"""The detector worker with the LLM judge enabled: real redis-server, a scripted judge endpoint over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.contract.profile import JudgeConfig
from detector_service.contract.wire import Category, Finding, Severity, TurnEvent, Verdict, dumps, now_ms
from detector_service.engine import Engine, merge
from detector_service.llm.judge import Judge, make_client
from detector_service.metrics import DetectorMetrics
from detector_service.service import serve
from detector_service.settings import DetectorSettings
from detector_service.worker import Worker
from tests.scripted_llm import ScriptedLLM
from tests.turns import turn

pytestmark = pytest.mark.redis

REPLY = keys.reply_stream("judge-test")
CM_ANSWER = json.dumps(
    {"findings": [{"category": "CM", "message": "The user asked about a refund, not the order.", "confidence": 0.9}]}
)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture
def llm_url(llm: ScriptedLLM) -> Iterator[str]:
    with llm.serving() as url:
        yield url


def settings(redis_url: str, **over: Any) -> DetectorSettings:
    base: dict[str, Any] = {"redis_url": redis_url, "consumer_name": "w-judge", "metrics_port": 0, "block_ms": 50}
    return DetectorSettings(**(base | over))


def judge_config(llm_url: str, timeout_s: float = 10.0) -> JudgeConfig:
    return JudgeConfig(enabled=True, base_url=llm_url, model="judge-model", timeout_s=timeout_s)


async def run_worker(
    redis_url: str, llm_url: str, *, timeout_s: float = 10.0, **over: Any
) -> tuple[DetectorMetrics, list[streams.Entry]]:
    """One worker with a judge, until the stream has no work left; returns its metrics and the replies."""
    metrics = DetectorMetrics()
    config = judge_config(llm_url, timeout_s)
    judge = Judge(config, make_client(config, "sk-test"))
    client = Redis.from_url(redis_url)
    try:
        worker = Worker(settings(redis_url, **over), client, Engine(), metrics, judge)
        await worker.run(asyncio.Event(), until_idle=True)
        return metrics, await streams.read_replies(client, REPLY, "0-0", count=1000, block_ms=1)
    finally:
        await judge.aclose()
        await client.aclose()


def judge_calls(metrics: DetectorMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("fama_detector_judge_calls_total", {"outcome": outcome}) or 0.0


async def publish(redis: Redis, event: TurnEvent) -> None:
    await streams.publish(redis, keys.TURNS_STREAM, dumps(event), maxlen=1000)


def spoken(n: int, **kw: Any) -> TurnEvent:
    """A turn the judge is asked about: besides its call, the candidate talks to the user."""
    event = turn(n, **kw)
    return event.model_copy(update={"candidate": {**event.candidate, "content": "Let me look that order up."}})


def deadline_in(ms: int) -> int:
    return now_ms() + ms


def with_deadline(event: TurnEvent, deadline_ms: int) -> TurnEvent:
    return event.model_copy(update={"deadline_ms": deadline_ms})


def verdicts(entries: list[streams.Entry]) -> list[Verdict]:
    return [Verdict.model_validate_json(e.data or "") for e in entries]


async def test_judge_findings_are_merged_into_the_published_verdict(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.answers["fama_judge"] = CM_ANSWER
    event = with_deadline(spoken(1, reply_to=REPLY), deadline_in(30_000))
    await publish(redis, event)

    metrics, entries = await run_worker(redis_url, llm_url)

    [verdict] = verdicts(entries)
    judged = [f for f in verdict.findings if f.detector == "llm_judge"]
    assert [(f.category, f.message) for f in judged] == [(Category.CM, "The user asked about a refund, not the order.")]
    engine = Engine()
    extra = [Finding(category=Category.CM, detector="llm_judge", severity=Severity.WARNING, message=judged[0].message)]
    assert verdict.action == merge(engine, engine.evaluate(event), event.candidate, extra).action
    assert judge_calls(metrics, "ok") == 1
    [asked] = llm.asked("fama_judge")
    assert "#W0000001" in asked["messages"][-1]["content"]


async def test_slow_judge_past_the_deadline_publishes_the_deterministic_verdict_in_time(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.answers["fama_judge"] = CM_ANSWER
    llm.delay_s = 3.0  # well past the turn's deadline, well inside the judge's own timeout
    deadline = deadline_in(1500)  # room for the worker to start on a busy host
    event = with_deadline(spoken(1, reply_to=REPLY), deadline)
    await publish(redis, event)

    metrics, entries = await run_worker(redis_url, llm_url, timeout_s=10.0)

    [entry] = entries
    published_ms = int(entry.id.split("-")[0])  # the reply stream entry id is Redis' clock at XADD
    assert published_ms <= deadline
    [verdict] = verdicts(entries)
    assert verdict.findings == Engine().evaluate(event).findings
    assert judge_calls(metrics, "timeout") == 1
    assert judge_calls(metrics, "ok") == 0


async def test_a_near_deadline_is_not_held_back_by_a_neighbours_judge_call(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.answers["fama_judge"] = CM_ANSWER
    llm.delay_s = 3.0
    near_deadline = deadline_in(1500)
    near = with_deadline(spoken(1, reply_to=REPLY), near_deadline)
    far = spoken(2, reply_to=REPLY)  # no deadline: the judge's own timeout bounds it
    await publish(redis, far)
    await publish(redis, near)

    metrics, entries = await run_worker(redis_url, llm_url, timeout_s=10.0)

    by_turn = {v.turn_id: (e, v) for e, v in zip(entries, verdicts(entries), strict=True)}
    entry, verdict = by_turn[near.turn_id]
    assert int(entry.id.split("-")[0]) <= near_deadline
    assert verdict.findings == Engine().evaluate(near).findings
    assert "llm_judge" in {f.detector for f in by_turn[far.turn_id][1].findings}
    assert [v.turn_id for v in verdicts(entries)] == [near.turn_id, far.turn_id]
    assert (judge_calls(metrics, "timeout"), judge_calls(metrics, "ok")) == (1, 1)


@pytest.mark.parametrize(("answer", "status"), [("the candidate looks fine to me", 200), (CM_ANSWER, 500)])
async def test_failing_judge_publishes_the_deterministic_verdict_and_counts_it(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str, answer: str, status: int
) -> None:
    llm.answers["fama_judge"] = answer
    llm.status = status
    event = with_deadline(turn(1, tool="drop_database", reply_to=REPLY), deadline_in(30_000))
    await publish(redis, event)

    metrics, entries = await run_worker(redis_url, llm_url)

    [verdict] = verdicts(entries)
    expected = Engine().evaluate(event)
    assert (verdict.findings, verdict.action) == (expected.findings, expected.action)
    assert judge_calls(metrics, "error") == 1
    assert (await streams.group_stats(redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)).pending == 0


async def test_a_turn_already_past_its_deadline_is_not_sent_to_the_judge(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    event = with_deadline(spoken(1, reply_to=REPLY), now_ms() - 1)
    await publish(redis, event)

    metrics, entries = await run_worker(redis_url, llm_url)

    assert len(entries) == 1
    assert judge_calls(metrics, "skipped") == 1
    assert llm.requests == []


@pytest.mark.parametrize(("concurrency", "expected"), [(16, 4), (2, 2)])
async def test_judge_calls_of_a_batch_run_concurrently_up_to_the_bound(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str, concurrency: int, expected: int
) -> None:
    llm.answers["fama_judge"] = json.dumps({"findings": []})
    llm.delay_s = 0.3
    for n in range(4):
        await publish(redis, with_deadline(spoken(n, reply_to=REPLY), deadline_in(60_000)))

    metrics, entries = await run_worker(redis_url, llm_url, judge_concurrency=concurrency)

    assert len(entries) == 4
    assert judge_calls(metrics, "ok") == 4
    assert llm.max_in_flight == expected


async def test_serve_runs_the_judge_the_profile_enables_with_the_configured_key(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str, tmp_path: Path
) -> None:
    llm.answers["fama_judge"] = CM_ANSWER
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"judge": {"enabled": True, "base_url": llm_url, "model": "judge-model"}}))
    await publish(redis, with_deadline(spoken(1, reply_to=REPLY), deadline_in(30_000)))

    code = await serve(settings(redis_url, profile=str(profile), judge_api_key="sk-judge"), until_idle=True)

    assert code == 0
    [verdict] = verdicts(await streams.read_replies(redis, REPLY, "0-0", count=10, block_ms=1))
    assert "llm_judge" in {f.detector for f in verdict.findings}
    assert llm.authorizations == ["Bearer sk-judge"]


async def test_a_turn_that_only_looks_up_is_not_sent_to_the_judge(
    redis_url: str, redis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.answers["fama_judge"] = CM_ANSWER
    await publish(redis, with_deadline(turn(1, reply_to=REPLY), deadline_in(30_000)))  # a read call, no words
    await publish(redis, with_deadline(spoken(2, reply_to=REPLY), deadline_in(30_000)))

    metrics, entries = await run_worker(redis_url, llm_url)

    assert len(entries) == 2
    assert judge_calls(metrics, "ok") == 1
    assert len(llm.asked("fama_judge")) == 1
    judged = {v.turn_id: "llm_judge" in {f.detector for f in v.findings} for v in verdicts(entries)}
    assert sorted(judged.values()) == [False, True]


def test_default_consumer_name_is_unique_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAMA_CONSUMER_NAME", raising=False)
    assert DetectorSettings().consumer_name == f"{socket.gethostname()}-{os.getpid()}"
    code = "from detector_service.settings import DetectorSettings; print(DetectorSettings().consumer_name)"
    env = {k: v for k, v in os.environ.items() if k != "FAMA_CONSUMER_NAME"}
    names = {
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(names) == 2
    monkeypatch.setenv("FAMA_CONSUMER_NAME", "detector-0")
    assert DetectorSettings().consumer_name == "detector-0"
