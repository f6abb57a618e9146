"""The LLM-backed DCE: extracted once per policy text in the detector service, cached in Redis, injected by the proxy.

Real redis-server, a scripted OpenAI-compatible LLM over real HTTP, the proxy on uvicorn in front of a
scripted model, and ``fama detector`` as its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.bus.client import PROXY, redis_client
from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.extraction import PolicyExtraction, policy_hash
from detector_service.contract.profile import Profile
from detector_service.contract.wire import TurnEvent, dumps
from detector_service.engine import Engine
from detector_service.llm.extraction import ExtractionScheduler, Extractor
from detector_service.llm.judge import make_client
from detector_service.metrics import DetectorMetrics
from detector_service.service import extraction_schedulers
from detector_service.settings import DetectorSettings
from detector_service.worker import Worker
from proxy.metrics import ProxyMetrics
from proxy.supervision.extractions import ExtractionReader
from proxy.supervision.verdicts import REPLY_BLOCK_MS
from tests.scripted_llm import ScriptedLLM
from tests.servers import free_port, stop_process
from tests.supervised_upstream import ScriptedModel, context_in
from tests.supervision_harness import CANCEL, LOOKED_UP, QUESTION, SYSTEM, TOOLS, proxy_for

pytestmark = pytest.mark.redis

RULE = "Before cancel_reservation, read the reservation back and get an explicit yes from the user."
UNRELATED = "Greet returning members by their tier name."
RULES_ANSWER = json.dumps(
    {
        "rules": [
            {"rule": UNRELATED, "tools": []},
            {"rule": RULE, "tools": ["cancel_reservation", "not_a_declared_tool"]},
        ]
    }
)
DCE_SECTION = "## DCE: Policy rules that apply now"


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def llm() -> ScriptedLLM:
    llm = ScriptedLLM()
    llm.answers["fama_policy_rules"] = RULES_ANSWER
    return llm


@pytest.fixture
def llm_url(llm: ScriptedLLM) -> Iterator[str]:
    with llm.serving() as url:
        yield url


def profile_for(llm_url: str, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "agents": ["DCE"],
        "llm_agents": {"agents": ["DCE"], "ttl_s": 3600},
        "judge": {"base_url": llm_url, "model": "rules-model"},
        "deadline_ms": 5_000,
    }
    return base | over


def cancel_turn() -> TurnEvent:
    return TurnEvent(
        session_id="s1", messages=LOOKED_UP, tools=TOOLS, candidate={"role": "assistant", "tool_calls": [CANCEL]}
    )


@contextlib.asynccontextmanager
async def scheduler(
    redis_url: str, llm_url: str, name: str
) -> AsyncIterator[tuple[ExtractionScheduler, DetectorMetrics]]:
    """One replica's scheduler with its own Redis connection and LLM client."""
    profile = Profile.model_validate(profile_for(llm_url))
    metrics = DetectorMetrics()
    client = Redis.from_url(redis_url)
    extractor = Extractor(profile.judge, make_client(profile.judge, None), profile.llm_agents.timeout_s)
    found = ExtractionScheduler(client, extractor, profile, metrics, name)
    try:
        yield found, metrics
    finally:
        await found.aclose(5.0)
        await client.aclose()


def extractions(metrics: DetectorMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("fama_detector_extractions_total", {"outcome": outcome}) or 0.0


async def test_two_workers_extract_a_policy_once_and_cache_it_with_a_ttl(
    redis_url: str, aredis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.delay_s = 0.3
    for _ in range(4):
        await streams.publish(aredis, keys.TURNS_STREAM, dumps(cancel_turn()), maxlen=1000)

    async with scheduler(redis_url, llm_url, "a") as (a, ma), scheduler(redis_url, llm_url, "b") as (b, mb):
        workers = [
            Worker(
                DetectorSettings(redis_url=redis_url, consumer_name=name, batch_size=1, block_ms=50),
                found.redis,
                Engine(),
                DetectorMetrics(),
                extractions=found,
            )
            for name, found in (("a", a), ("b", b))
        ]
        await asyncio.gather(*(w.run(asyncio.Event(), until_idle=True) for w in workers))
        await asyncio.gather(a.wait(), b.wait())
        assert sum(w.processed for w in workers) == 4
        assert extractions(ma, "ok") + extractions(mb, "ok") == 1

    [asked] = llm.asked("fama_policy_rules")
    assert asked["model"] == "rules-model"
    assert asked["response_format"]["json_schema"]["schema"]["required"] == ["rules"]
    assert SYSTEM in asked["messages"][-1]["content"]
    assert "cancel_reservation" in asked["messages"][-1]["content"]
    digest = policy_hash(SYSTEM)
    stored = PolicyExtraction.model_validate_json(await aredis.get(keys.extraction_key(digest)) or "")
    assert stored.policy_hash == digest
    # Tags outside the declared tools are dropped; the rules themselves are kept in the policy's order.
    assert [(r.rule, r.tools) for r in stored.rules] == [(UNRELATED, []), (RULE, ["cancel_reservation"])]
    assert 0 < await aredis.ttl(keys.extraction_key(digest)) <= 3600
    assert await aredis.exists(keys.extraction_lock_key(digest)) == 0


async def test_replicas_noticing_the_same_policy_at_once_make_one_llm_call(
    redis_url: str, aredis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.delay_s = 0.3
    async with scheduler(redis_url, llm_url, "a") as (a, ma), scheduler(redis_url, llm_url, "b") as (b, mb):
        a.notice([cancel_turn()])
        b.notice([cancel_turn(), cancel_turn()])
        await asyncio.gather(a.wait(), b.wait())
        assert len(llm.asked("fama_policy_rules")) == 1
        assert extractions(ma, "ok") + extractions(mb, "ok") == 1
        assert extractions(ma, "locked") + extractions(mb, "locked") == 1
        # Once cached, a replica that sees the policy again asks nobody.
        b.notice([cancel_turn()])
        await b.wait()
    assert len(llm.asked("fama_policy_rules")) == 1


async def test_a_failed_extraction_is_counted_and_backs_off_for_every_replica(
    redis_url: str, aredis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.answers["fama_policy_rules"] = "Here are the rules: be nice."
    async with scheduler(redis_url, llm_url, "a") as (a, ma), scheduler(redis_url, llm_url, "b") as (b, mb):
        a.notice([cancel_turn()])
        await a.wait()
        assert extractions(ma, "error") == 1
        b.notice([cancel_turn()])
        await b.wait()
        assert extractions(mb, "locked") == 1
    assert len(llm.asked("fama_policy_rules")) == 1
    digest = policy_hash(SYSTEM)
    assert await aredis.exists(keys.extraction_key(digest)) == 0
    assert await aredis.pttl(keys.extraction_lock_key(digest)) > 0


async def test_a_stopping_replica_cuts_its_extraction_short_and_frees_the_lock(
    redis_url: str, aredis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    llm.delay_s = 2.0
    digest = policy_hash(SYSTEM)
    async with scheduler(redis_url, llm_url, "a") as (a, metrics):
        a.notice([cancel_turn()])
        assert await asyncio.to_thread(llm.arrived.wait, 10.0)
        assert await aredis.exists(keys.extraction_lock_key(digest)) == 1
        await a.aclose(0.05)
        assert await aredis.exists(keys.extraction_lock_key(digest)) == 0
        assert await aredis.exists(keys.extraction_key(digest)) == 0
        assert extractions(metrics, "ok") == 0


async def test_the_proxy_reader_answers_none_on_a_miss_and_on_a_redis_outage(redis_url: str, aredis: Redis) -> None:
    metrics = ProxyMetrics()
    up = redis_client(redis_url, PROXY, block_ms=REPLY_BLOCK_MS)
    down = redis_client(f"redis://127.0.0.1:{free_port()}/0", PROXY, block_ms=REPLY_BLOCK_MS)
    try:
        assert await ExtractionReader(up, metrics).get(SYSTEM) is None
        stored = PolicyExtraction(policy_hash=policy_hash(SYSTEM), model="m", rules=[{"rule": RULE, "tools": []}])
        await aredis.set(keys.extraction_key(policy_hash(SYSTEM)), stored.model_dump_json())
        assert await ExtractionReader(up, metrics).get(SYSTEM) == stored
        assert await ExtractionReader(down, metrics).get(SYSTEM) is None
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "extraction_read"}) == 1
    finally:
        await up.aclose()
        await down.aclose()


# --- through the proxy, with a real ``fama detector`` process ----------------------------------------


@contextlib.contextmanager
def detector_process(redis_url: str, profile: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from proxy.cli import main; main()", "detector", "--redis-url", redis_url],
        env={"FAMA_METRICS_PORT": "0", "FAMA_PROFILE": str(profile), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: _has_group(client) or proc.poll() is not None)
        client.close()
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield
    finally:
        stop_process(proc, timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def _has_group(client: redis.Redis) -> bool:
    with contextlib.suppress(redis.ResponseError):
        return any(g["name"] == keys.DETECTOR_GROUP.encode() for g in client.xinfo_groups(keys.TURNS_STREAM))
    return False


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> None:
    # Waiting on another process's progress: there is no event to block on across the process boundary.
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def dce_lines(body: dict[str, Any]) -> list[str]:
    context = context_in(body)
    assert context is not None
    lines = context.splitlines()
    start = lines.index(DCE_SECTION) + 1
    section = []
    for line in lines[start:]:
        if not line.startswith("- "):
            break
        section.append(line[2:])
    return section


def test_proxy_injects_the_cached_extraction_and_never_waits_for_it(
    redis_url: str, llm: ScriptedLLM, llm_url: str, tmp_path: Path
) -> None:
    llm.delay_s = 3.0  # the extraction is still running while the next turns go through
    profile = profile_for(llm_url)
    path = tmp_path / "detector-profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    model = ScriptedModel(lambda body: {"content": QUESTION})
    store = redis.Redis.from_url(redis_url)
    key = keys.extraction_key(policy_hash(SYSTEM))
    try:
        with (
            detector_process(redis_url, path),
            proxy_for(model, tmp_path, redis_url=redis_url, profile=profile) as (
                client,
                _,
            ),
        ):
            client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS)
            wait_for(lambda: llm.in_flight == 1)  # the worker saw the policy and asked the LLM

            answer = client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS)
            # The turn came back while the extraction was still being computed: it did not wait for it.
            assert llm.in_flight == 1
            assert store.exists(key) == 0
            assert answer.choices[0].message.content == QUESTION

            wait_for(lambda: store.exists(key) == 1)
            client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS)

        first, second, third = model.bodies()
        for before in (first, second):
            lines = dce_lines(before)
            assert lines, "the deterministic DCE has its say before the extraction exists"
            assert RULE not in lines
            assert any("explicit user confirmation" in line for line in lines)
        assert dce_lines(third) == [RULE]
        assert len(llm.asked("fama_policy_rules")) == 1
    finally:
        store.close()


async def test_a_pushed_llm_agents_section_starts_and_stops_the_extraction(
    redis_url: str, aredis: Redis, llm: ScriptedLLM, llm_url: str
) -> None:
    holder = ProfileHolder.of(Profile())  # started without DCE
    metrics = DetectorMetrics()
    client = Redis.from_url(redis_url)
    settings = DetectorSettings(redis_url=redis_url, consumer_name="w", batch_size=1, block_ms=50)
    schedulers = extraction_schedulers(holder, client, metrics, settings)
    worker = Worker(settings, client, Engine(), metrics, extractions=schedulers)

    async def process(turn: TurnEvent) -> None:
        await streams.publish(aredis, keys.TURNS_STREAM, dumps(turn), maxlen=1000)
        await worker.run(asyncio.Event(), until_idle=True)
        if schedulers.current is not None:
            await schedulers.current.wait()

    try:
        await process(cancel_turn())
        assert schedulers.current is None
        assert llm.asked("fama_policy_rules") == []
        holder.offer(ActiveProfile(Profile.model_validate(profile_for(llm_url)), 1))  # pushed: DCE on
        first = schedulers.current
        assert first is not None
        await process(cancel_turn())
        assert len(llm.asked("fama_policy_rules")) == 1
        assert await aredis.exists(keys.extraction_key(policy_hash(SYSTEM))) == 1
        holder.offer(ActiveProfile(Profile.model_validate(profile_for(llm_url, deadline_ms=4_000)), 2))
        assert schedulers.current is first  # the sections it is built from did not change
        holder.offer(ActiveProfile(Profile(), 3))  # pushed: DCE off again
        assert schedulers.current is None
        other = cancel_turn().model_copy(update={"messages": [{"role": "system", "content": "Another policy."}]})
        await process(other)
        assert len(llm.asked("fama_policy_rules")) == 1  # the new policy text was not sent anywhere
    finally:
        for scheduler in schedulers.drain():
            await scheduler.aclose(5.0)
        await client.aclose()
