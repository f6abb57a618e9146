"""The LLM judge in embedded mode (no Redis, no detector service): the proxy asks it in-process, within the
turn's deadline. Official SDK -> proxy -> scripted model; the judge is a scripted endpoint over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.wire import Category
from tests.scripted_llm import ScriptedLLM
from tests.supervised_upstream import ScriptedModel, feedback_in
from tests.supervision_harness import CANCEL, LOOKED_UP, QUESTION, TOOLS, interventions, proxy_for

CONFIRMED: list[Any] = [*LOOKED_UP, {"role": "assistant", "content": QUESTION}, {"role": "user", "content": "Yes."}]
UNDERSTOOD = "Understood: I will not cancel it. You asked about a refund; let me check that."
CM_ANSWER = json.dumps(
    {
        "findings": [
            {"category": "CM", "message": "The user asked about a refund, not a cancellation.", "confidence": 0.9}
        ]
    }
)


def _model(body: dict[str, Any]) -> dict[str, Any]:
    """Cancels (confirmed, so the deterministic detectors pass it); answers in words after feedback."""
    return {"content": UNDERSTOOD} if feedback_in(body) else {"tool_calls": [CANCEL]}


def _judge_answer(body: dict[str, Any]) -> str:
    """CM for the cancellation; nothing to say about the answer in words."""
    candidate = body["messages"][-1]["content"].rsplit("CANDIDATE:", 1)[1]
    return CM_ANSWER if "cancel_reservation" in candidate else json.dumps({"findings": []})


@pytest.fixture
def judge() -> Iterator[tuple[ScriptedLLM, str]]:
    llm = ScriptedLLM()
    llm.responder = _judge_answer
    with llm.serving() as url:
        yield llm, url


def _profile(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    judge = {"enabled": True, "base_url": url, "model": "judge-model", "timeout_s": timeout_s}
    return {"version": 1, "judge": judge, "deadline_ms": 3000, "actions": {"CM": "retry"}}


def test_the_judges_finding_drives_the_intervention(judge: tuple[ScriptedLLM, str], tmp_path: Path) -> None:
    llm, url = judge
    with proxy_for(
        ScriptedModel(_model), tmp_path, mode="enforce", profile=_profile(url), judge_api_key="sk-embedded"
    ) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CONFIRMED, tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "retry:CM"
        assert raw.parse().choices[0].message.content == UNDERSTOOD
        assert [i.categories for i in interventions(app)] == [[Category.CM]]
        assert (app.metrics.registry.get_sample_value("fama_judge_calls_total", {"outcome": "ok"}) or 0) >= 1
    assert llm.authorizations[0] == "Bearer sk-embedded"
    assert "cancel_reservation" in llm.asked("fama_judge")[0]["messages"][-1]["content"]


def test_a_slow_judge_leaves_the_deterministic_verdict(judge: tuple[ScriptedLLM, str], tmp_path: Path) -> None:
    llm, url = judge
    llm.delay_s = 5.0  # past the 3 s deadline: the judge gets what is left of it, then the turn goes on
    with proxy_for(ScriptedModel(_model), tmp_path, mode="enforce", profile=_profile(url)) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CONFIRMED, tools=TOOLS)
        assert "x-fama-intervention" not in raw.headers
        assert raw.parse().choices[0].message.tool_calls
        assert app.metrics.registry.get_sample_value("fama_judge_calls_total", {"outcome": "timeout"}) == 1


def test_a_look_up_is_not_sent_to_the_judge(judge: tuple[ScriptedLLM, str], tmp_path: Path) -> None:
    llm, url = judge
    look_up = {
        "tool_calls": [
            {
                "id": "c9",
                "type": "function",
                "function": {"name": "get_reservation_details", "arguments": '{"reservation_id": "ZFA04Y"}'},
            }
        ]
    }
    with proxy_for(ScriptedModel(lambda body: look_up), tmp_path, mode="enforce", profile=_profile(url)) as (
        client,
        _app,
    ):
        completion = client.chat.completions.create(model="m", messages=CONFIRMED, tools=TOOLS)
    assert completion.choices[0].message.tool_calls
    assert llm.asked("fama_judge") == []
