"""The LLM judge against a scripted OpenAI-compatible server over real HTTP, with the official client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request

from detector_service.judge import Judge, JudgeError, make_client
from detector_service.profile import JudgeConfig
from detector_service.wire import Category, TurnEvent
from tests.servers import serve_in_thread


class Script:
    """What the fake model answers next, and what it was asked."""

    def __init__(self) -> None:
        self.answer: str = json.dumps({"findings": []})
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []


def scripted_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        script.requests.append(body)
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        return {
            "id": "chatcmpl-judge",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": script.answer}}
            ],
        }

    return app


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def base_url(script: Script) -> Iterator[str]:
    with serve_in_thread(scripted_app(script)) as url:
        yield f"{url}/v1"


@contextlib.asynccontextmanager
async def judge_for(base_url: str, timeout_s: float = 5.0) -> AsyncIterator[Judge]:
    config = JudgeConfig(enabled=True, base_url=base_url, model="judge-model", timeout_s=timeout_s)
    judge = Judge(config, make_client(config, "sk-test"))
    try:
        yield judge
    finally:
        await judge.aclose()


def a_turn(turn_id: str = "turn-1") -> TurnEvent:
    return TurnEvent(
        turn_id=turn_id,
        session_id="s1",
        messages=[
            {"role": "system", "content": "Obtain explicit user confirmation (yes) before cancelling."},
            {"role": "user", "content": "Can you cancel reservation ABC123?"},
        ],
        candidate={
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "ABC123"}'},
                }
            ],
        },
    )


async def test_findings_come_from_the_schema_constrained_answer(base_url: str, script: Script) -> None:
    script.answer = json.dumps(
        {
            "findings": [
                {"category": "DCV", "message": "Cancelled without a yes from the user.", "confidence": 0.9},
                {"category": "CM", "message": "Maybe not what was asked.", "confidence": 0.2},
            ]
        }
    )
    async with judge_for(base_url) as judge:
        found = await judge.findings(a_turn())
    assert [(f.category, f.detector) for f in found] == [(Category.DCV, "llm_judge")]
    assert "without a yes" in found[0].message
    sent = script.requests[0]
    assert sent["model"] == "judge-model"
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"]["required"] == ["findings"]
    assert "ABC123" in sent["messages"][-1]["content"]
    assert "explicit user confirmation" in sent["messages"][-1]["content"]


async def test_one_call_per_turn(base_url: str, script: Script) -> None:
    script.delay_s = 0.2
    async with judge_for(base_url) as judge:
        first, second = await asyncio.gather(judge.findings(a_turn()), judge.findings(a_turn()))
        third = await judge.findings(a_turn())
        assert first == second == third == []
        assert len(script.requests) == 1
        await judge.findings(a_turn("turn-2"))
    assert len(script.requests) == 2


async def test_timeout_is_bounded(base_url: str, script: Script) -> None:
    script.delay_s = 1.5
    start = time.monotonic()
    async with judge_for(base_url, timeout_s=0.3) as judge:
        with pytest.raises(JudgeError, match="timed out"):
            await judge.findings(a_turn())
    assert time.monotonic() - start < 1.2


async def test_malformed_answer_is_an_error_not_a_pass(base_url: str, script: Script) -> None:
    script.answer = '{"verdict": "looks fine"}'
    async with judge_for(base_url) as judge:
        with pytest.raises(JudgeError, match="schema"):
            await judge.findings(a_turn())
