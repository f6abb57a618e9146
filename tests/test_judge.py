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
from fastapi.responses import JSONResponse

from detector_service.contract.profile import JudgeConfig, Profile
from detector_service.contract.wire import Category, TurnEvent
from detector_service.llm.judge import Judge, JudgeError, _transcript, make_client, worth_judging
from tests.servers import serve_in_thread
from tests.turns import turn, unconfirmed_cancel


class Script:
    """What the fake model answers next, and what it was asked."""

    def __init__(self) -> None:
        self.answer: str = json.dumps({"findings": []})
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        # When set, json_schema response formats get a 500 with this message (llama-cpp-python's refusal).
        self.json_schema_error: str | None = None


def scripted_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        script.requests.append(body)
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        if script.json_schema_error and body.get("response_format", {}).get("type") == "json_schema":
            error = {"message": script.json_schema_error, "type": "internal_server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=500)
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
    return unconfirmed_cancel(turn_id)


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


LLAMA_REFUSAL = "1 validation error: response_format.type: Input should be 'text' or 'json_object'"


async def test_servers_that_refuse_json_schema_get_json_object_with_the_schema(base_url: str, script: Script) -> None:
    script.json_schema_error = LLAMA_REFUSAL
    script.answer = json.dumps({"findings": [{"category": "DCV", "message": "No yes.", "confidence": 0.8}]})
    async with judge_for(base_url) as judge:
        first = await judge.findings(a_turn("turn-1"))
        second = await judge.findings(a_turn("turn-2"))
    assert [f.category for f in first] == [f.category for f in second] == [Category.DCV]
    formats = [r["response_format"] for r in script.requests]
    # One refused json_schema request, then json_object + schema for this call and every later one.
    assert [f["type"] for f in formats] == ["json_schema", "json_object", "json_object"]
    assert formats[1]["schema"]["required"] == ["findings"]


async def test_other_server_errors_are_judge_errors_without_a_second_try(base_url: str, script: Script) -> None:
    script.json_schema_error = "CUDA out of memory"
    async with judge_for(base_url) as judge:
        with pytest.raises(JudgeError, match="request failed"):
            await judge.findings(a_turn())
    assert len(script.requests) == 1


async def test_confidence_outside_its_bounds_is_clamped(base_url: str, script: Script) -> None:
    # Grammar-constrained answers keep the schema's shape but not its numeric bounds.
    script.answer = json.dumps(
        {
            "findings": [
                {"category": "IFU", "message": "Gave up early.", "confidence": 2},
                {"category": "CM", "message": "Unsure.", "confidence": -1},
            ]
        }
    )
    async with judge_for(base_url) as judge:
        found = await judge.findings(a_turn())
    assert [(f.category, f.evidence["confidence"]) for f in found] == [(Category.IFU, 1.0)]


def test_the_transcript_takes_malformed_recorded_calls() -> None:
    # Recorded trajectories (replay) can hold calls that are not objects; the judge still gets a transcript.
    turn = TurnEvent(
        session_id="s",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"function": "x"}, 5, {"function": {"name": "a", "arguments": "{}"}}]},
        ],
        tools=[],
        candidate={"role": "assistant", "content": "ok"},
    )
    assert _transcript(turn, 1000) == ("", "user: hi\nassistant: [call ?] [call a {}]")


def test_which_turns_the_judge_is_asked_about() -> None:
    look_up = turn(1)  # one read call, no words to the user
    cancel = unconfirmed_cancel()
    spoken = look_up.model_copy(update={"candidate": {**look_up.candidate, "content": "Checking your order."}})
    empty = look_up.model_copy(update={"candidate": {"role": "assistant", "content": ""}})
    default = Profile()
    assert [worth_judging(t, default) for t in (look_up, cancel, spoken, empty)] == [False, True, True, False]
    every = Profile(judge=JudgeConfig(skip_reads=False))
    assert worth_judging(look_up, every)
