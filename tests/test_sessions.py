from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from detector_service.bus.keys import session_outcome_key, session_state_key
from detector_service.bus.writer import BatchWriter
from detector_service.contract.profile import AgentName
from proxy.metrics import ProxyMetrics
from proxy.supervision.recorder import RedisRecorder
from proxy.supervision.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionRef,
    SessionState,
    derive_session_id,
    identify,
    session_from_header,
)

TOOLS = [{"type": "function", "function": {"name": "get_order"}}, {"type": "function", "function": {"name": "cancel"}}]
CONVO = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "Cancel my order #W123."},
]


def test_derived_id_is_the_one_earlier_releases_derived() -> None:
    """Sessions in flight keep their state across an upgrade: the id is sha256 of the same prefix bytes."""
    convo = [{"role": "system", "content": 'Agent \u00e9\n\t"x" \u2028 \x01'}, *CONVO[1:]]
    prefix = json.dumps(
        [['Agent \u00e9\n\t"x" \u2028 \x01'], "Cancel my order #W123.", ["cancel", "get_order"]],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert derive_session_id(convo, TOOLS) == "c-" + hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:32]


def test_derived_id_is_stable_as_the_conversation_grows() -> None:
    later = [*CONVO, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "yes"}]
    assert derive_session_id(CONVO, TOOLS) == derive_session_id(later, TOOLS)
    assert derive_session_id(CONVO, TOOLS) == derive_session_id(CONVO, list(reversed(TOOLS)))


def test_derived_id_separates_conversations() -> None:
    other_user = [CONVO[0], {"role": "user", "content": "Cancel my order #W999."}]
    other_system = [{"role": "system", "content": "You are a travel agent."}, CONVO[1]]
    ids = {
        derive_session_id(CONVO, TOOLS),
        derive_session_id(other_user, TOOLS),
        derive_session_id(other_system, TOOLS),
        derive_session_id(CONVO, TOOLS[:1]),
    }
    assert len(ids) == 4


def test_header_wins_and_unsafe_values_are_hashed() -> None:
    ref = identify("conv-42", "acme", CONVO, TOOLS)
    assert ref == SessionRef("acme", "conv-42", derived=False)
    assert identify(None, None, CONVO, TOOLS).tenant == "default"
    assert identify("  ", None, CONVO, TOOLS).derived
    unsafe = session_from_header("a b\r\nc" * 50)
    assert unsafe.startswith("h-")
    assert len(unsafe) == 34
    assert unsafe == session_from_header("a b\r\nc" * 50)


async def test_memory_store_round_trip_ttl_and_lru_bound() -> None:
    now = [0.0]
    store = MemorySessionStore(max_sessions=2, ttl_s=10, clock=lambda: now[0])
    a, b, c = (SessionRef("t", x, False) for x in "abc")
    state = SessionState(interventions=1)
    state.add_guidance(["[DCV] ask first"])
    await store.save(a, state)
    state.guidance.append("mutated after save")
    loaded = await store.load(a)
    assert loaded.guidance == ["[DCV] ask first"]
    assert loaded.interventions == 1
    await store.save(b, SessionState())
    await store.load(a)  # a is now the most recently used
    await store.save(c, SessionState())
    assert len(store) == 2
    assert (await store.load(a)).interventions == 1
    assert (await store.load(b)) == SessionState()  # evicted
    now[0] = 11.0
    assert (await store.load(a)) == SessionState()  # expired


def test_state_bounds_guidance_and_deduplicates_agents() -> None:
    state = SessionState()
    state.add_guidance([f"note {i}" for i in range(20)])
    state.add_guidance(["note 19"])
    assert len(state.guidance) == 6
    assert state.guidance[-1] == "note 19"
    state.activate([AgentName.TOR, AgentName.TOR, AgentName.DCE])
    assert state.agents == [AgentName.TOR, AgentName.DCE]


async def test_redis_store_uses_the_state_key_with_ttl(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisSessionStore(client, ttl_s=120)
        ref = SessionRef("acme", "s1", False)
        state = SessionState(agents=[AgentName.VERIFIER], turns=3)
        await store.save(ref, state)
        assert await store.load(ref) == state
        ttl = await client.ttl(session_state_key("acme", "s1"))
        assert 0 < ttl <= 120
        assert await store.load(SessionRef("other", "s1", False)) == SessionState()
    finally:
        await client.aclose()


async def test_redis_store_outage_degrades_to_empty_state() -> None:
    metrics = ProxyMetrics()
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    try:
        store = RedisSessionStore(client, ttl_s=60, metrics=metrics, timeout_s=0.5)
        ref = SessionRef("t", "s", False)
        await store.save(ref, SessionState(turns=1))
        assert await store.load(ref) == SessionState()
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "session_state_load"}) == 1
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "session_state_save"}) == 1
    finally:
        await client.aclose()


async def test_redis_store_save_soon_is_read_back_in_order_by_this_process(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisSessionStore(client, ttl_s=120)
        ref = SessionRef("acme", "soon", False)
        state = SessionState(guidance=["check the order first"], turns=1)
        store.save_soon(ref, state)
        state.turns = 2  # a caller going on with its copy changes nothing already handed over
        store.save_soon(ref, SessionState(turns=5))
        assert await store.load(ref) == SessionState(turns=5)  # the later write, never the earlier one
        store.save_soon(ref, SessionState(turns=6, interventions=1))
        await store.drain()
        assert (
            await client.get(session_state_key("acme", "soon"))
            == SessionState(turns=6, interventions=1).model_dump_json().encode()
        )
    finally:
        await client.aclose()


async def test_redis_store_save_soon_outage_is_counted_not_raised() -> None:
    metrics = ProxyMetrics()
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    try:
        store = RedisSessionStore(client, ttl_s=60, metrics=metrics, timeout_s=0.5)
        store.save_soon(SessionRef("t", "s", False), SessionState(turns=1))
        await store.drain()
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "session_state_save"}) == 1
    finally:
        await client.aclose()


async def test_redis_store_save_soon_rides_in_the_recorders_batch(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    writer = BatchWriter(client)
    recorder = RedisRecorder(client, writer=writer)
    try:
        key = session_state_key("acme", "batched")
        assert writer.set_soon(key, "{}", 60) is None  # no writer running: the caller writes
        await recorder.start()
        store = RedisSessionStore(client, ttl_s=120, writer=writer)
        ref = SessionRef("acme", "batched", False)
        store.save_soon(ref, SessionState(turns=1))
        store.save_soon(ref, SessionState(turns=2, guidance=["ask for the order id"]))
        await recorder.flush()  # the recorder's writer sent both: nothing of the store's own is pending
        assert (
            await client.get(key) == SessionState(turns=2, guidance=["ask for the order id"]).model_dump_json().encode()
        )
        assert 0 < await client.ttl(key) <= 120
        store.save_soon(ref, SessionState(turns=3))
        assert await store.load(ref) == SessionState(turns=3)  # waits for the queued write, never reads stale
    finally:
        await recorder.stop()
        await client.aclose()


async def test_redis_store_batched_save_outage_is_counted_not_raised() -> None:
    metrics = ProxyMetrics()
    # No retries, like the proxy's own client: the batch has no deadline of its own, the connect timeout bounds it.
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05, retry=Retry(NoBackoff(), 0))
    writer = BatchWriter(client)
    recorder = RedisRecorder(client, metrics, writer=writer)
    try:
        await recorder.start()
        store = RedisSessionStore(client, ttl_s=60, metrics=metrics, timeout_s=0.5, writer=writer)
        store.save_soon(SessionRef("t", "s", False), SessionState(turns=1))
        await store.drain()
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "session_state_save"}) == 1
        assert metrics.registry.get_sample_value("fama_redis_errors_total", {"op": "record"}) is None
    finally:
        await recorder.stop()
        await client.aclose()


async def test_memory_store_save_soon_is_immediate() -> None:
    store = MemorySessionStore()
    ref = SessionRef("t", "s", False)
    store.save_soon(ref, SessionState(turns=2))
    assert await store.load(ref) == SessionState(turns=2)


async def _outcome_claims(store: MemorySessionStore | RedisSessionStore) -> None:
    ref = SessionRef("acme", "s-outcome", False)
    in_flight = await store.load(ref)  # a turn read the state before the outcome was reported ...
    claims = await asyncio.gather(*(store.claim_outcome(ref, "success") for _ in range(20)))
    assert claims.count(None) == 1  # one report wins, at once or not
    assert set(claims) == {None, "success"}
    await store.save(ref, in_flight)  # ... and writes it back after: the outcome stays claimed
    assert await store.claim_outcome(ref, "failure") == "success"
    assert await store.claim_outcome(SessionRef("other", "s-outcome", False), "failure") is None


async def test_memory_store_claims_an_outcome_once() -> None:
    await _outcome_claims(MemorySessionStore())


async def test_redis_store_claims_an_outcome_once_with_its_own_key(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await _outcome_claims(RedisSessionStore(client, ttl_s=120))
        assert await client.get(session_outcome_key("acme", "s-outcome")) == b"success"
        assert 0 < await client.ttl(session_outcome_key("acme", "s-outcome")) <= 120
    finally:
        await client.aclose()


async def test_an_outcome_the_redis_store_cannot_claim_is_an_error_not_a_silent_drop() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    try:
        store = RedisSessionStore(client, ttl_s=60, timeout_s=0.05)
        with pytest.raises((RedisError, OSError, TimeoutError)):
            await store.claim_outcome(SessionRef("acme", "s1", False), "success")
    finally:
        await client.aclose()
