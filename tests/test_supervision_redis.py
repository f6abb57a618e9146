"""Supervision over the Redis bus: a real redis-server, a real ``fama detector`` process, or none of them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from detector_service.bus import keys
from tests.servers import detector_worker, free_port
from tests.supervised_upstream import ScriptedModel, call
from tests.supervision_harness import (
    CANCEL,
    LOOKED_UP,
    QUESTION,
    TOOLS,
    always_cancels,
    cancels_until_told,
    proxy_for,
)

pytestmark = pytest.mark.redis

DEADLINE_MS = 300


def looks_up_then_cancels(body: dict[str, Any]) -> dict[str, Any]:
    if any(m.get("role") == "tool" for m in body["messages"]):
        return {"tool_calls": [CANCEL]}
    return {"tool_calls": [call("get_reservation_details", '{"reservation_id": "ZFA04Y"}')]}


def _wait_for(check: object, timeout: float = 10.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert check()


def test_retry_with_verdicts_from_a_detector_worker(redis_url: str, tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    settings = {"mode": "enforce", "redis_url": redis_url, "profile": {"deadline_ms": 5_000}}
    with detector_worker(redis_url), proxy_for(model, tmp_path, **settings) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        assert "x-fama-degraded" not in raw.headers
        assert raw.parse().choices[0].message.content == QUESTION
        session = raw.headers["x-fama-session"]

    store = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        _wait_for(lambda: store.xlen(keys.INTERVENTIONS_STREAM) == 1)
        rows = store.xrange(keys.INTERVENTIONS_STREAM)
        assert rows is not None
        [(_, fields)] = rows
        assert fields is not None
        recorded = json.loads(fields["data"])
        assert (recorded["action"], recorded["categories"], recorded["session_id"]) == ("retry", ["DCV"], session)
        entries = [json.loads(e) for e in store.lrange(keys.session_key("default", session), 0, -1)]
        assert [e["kind"] for e in entries] == ["turn", "verdict", "intervention", "turn", "verdict"]
        assert store.ttl(keys.session_key("default", session)) > 0
        state_key = keys.session_state_key("default", session)
        assert json.loads(store.get(state_key) or "{}")["interventions"] == 1
        assert store.ttl(state_key) > 0
    finally:
        store.close()


def test_no_detector_running_passes_within_the_deadline_marked_degraded(redis_url: str, tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    settings = {"mode": "enforce", "redis_url": redis_url, "profile": {"deadline_ms": DEADLINE_MS}}
    with proxy_for(model, tmp_path, **settings) as (client, app):
        started = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        elapsed = time.monotonic() - started
        assert raw.headers["x-fama-degraded"] == "deadline"
        assert "x-fama-intervention" not in raw.headers
        calls = raw.parse().choices[0].message.tool_calls
        assert calls is not None
        assert len(calls) == 1
        assert elapsed < DEADLINE_MS / 1000 + 2.0  # one deadline, not a hang
        registry = app.metrics.registry
        assert registry.get_sample_value("fama_degraded_responses_total", {"reason": "deadline", "policy": "open"}) == 1

        chunks = list(client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS, stream=True))
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert final.choices[0].finish_reason == "tool_calls"
        assert final.model_extra is not None
        assert final.model_extra["fama"]["degraded"] == "deadline"


def test_redis_down_fails_open_by_default_and_closed_where_the_profile_says(tmp_path: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path, mode="enforce", redis_url=down) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-degraded"] == "outage"
        assert raw.parse().choices[0].message.tool_calls is not None

    closed = {"on_timeout": {"default": "open", "DCV": "closed"}}
    model = ScriptedModel(looks_up_then_cancels)
    with proxy_for(model, tmp_path, mode="enforce", redis_url=down, profile=closed) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-degraded"] == "outage"
        assert raw.headers["x-fama-intervention"] == "block:DCV"
        message = raw.parse().choices[0].message
        assert message.tool_calls is None
        assert message.content is not None
        assert message.content.startswith("I can't cancel reservation ZFA04Y right now.")
        # A read-only lookup puts no write at stake: it still passes, marked degraded.
        lookup = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP[:2], tools=TOOLS)
        assert lookup.headers["x-fama-degraded"] == "outage"
        assert "x-fama-intervention" not in lookup.headers
        calls = lookup.parse().choices[0].message.tool_calls
        assert calls is not None
        assert len(calls) == 1
