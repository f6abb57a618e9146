"""The LLM judge in embedded mode (no Redis, no detector service): the proxy asks it in-process, within the
turn's deadline. Official SDK -> proxy -> scripted model; the judge is a scripted endpoint over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import JudgeConfig, Profile
from detector_service.contract.wire import Category
from detector_service.llm.follows import Judges, judge_builder
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


ADMIN_KEY = "admin-key-judge-reload-0123456789"


def _push(client: Any, profile: dict[str, Any]) -> None:
    url = str(client.base_url).removesuffix("/v1/")
    answer = httpx2.post(
        url + "/admin/profile",
        content=yaml.safe_dump(profile),
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def test_a_pushed_judge_section_is_in_force_on_the_next_turn(judge: tuple[ScriptedLLM, str], tmp_path: Path) -> None:
    llm, url = judge
    without = {"version": 1, "deadline_ms": 3000, "actions": {"CM": "retry"}}
    other = ScriptedLLM()
    other.responder = _judge_answer
    with (
        other.serving() as other_url,
        proxy_for(ScriptedModel(_model), tmp_path, mode="enforce", profile=without, admin_key=ADMIN_KEY) as (client, _),
    ):

        def handling() -> str | None:
            raw = client.chat.completions.with_raw_response.create(model="m", messages=CONFIRMED, tools=TOOLS)
            return raw.headers.get("x-fama-intervention")

        assert handling() is None  # no judge: the confirmed cancel passes
        _push(client, _profile(url))
        assert handling() == "retry:CM"  # the pushed judge is asked, no restart
        asked = len(llm.asked("fama_judge"))
        assert asked >= 1
        _push(client, {**_profile(url), "actions": {"CM": "retry", "DCV": "guide"}})  # same judge section
        assert handling() == "retry:CM"
        _push(client, _profile(other_url))  # another endpoint: the turns go there from now on
        assert handling() == "retry:CM"
        assert len(other.asked("fama_judge")) >= 1
        _push(client, without)  # judge off again
        before = (len(llm.requests), len(other.requests))
        assert handling() is None
        assert (len(llm.requests), len(other.requests)) == before


def test_a_judge_section_that_cannot_build_a_judge_leaves_the_deterministic_verdicts() -> None:
    holder = ProfileHolder.of(Profile())
    judges = Judges(holder, judge_builder(None))
    assert judges.current is None
    holder.offer(ActiveProfile(Profile(judge=JudgeConfig(enabled=True, base_url="http://127.0.0.1:9/v1")), 1))
    assert judges.current is None  # enabled without a model: logged, the turns go without a judge
    holder.offer(
        ActiveProfile(Profile(judge=JudgeConfig(enabled=True, base_url="http://127.0.0.1:9/v1", model="j")), 2)
    )
    first = judges.current
    assert first is not None
    assert first.config.model == "j"
    holder.offer(ActiveProfile(Profile(judge=first.config, deadline_ms=900), 3))
    assert judges.current is first  # the same section keeps the judge, its client and its cache
    holder.offer(ActiveProfile(Profile(), 4))
    assert judges.current is None
    asyncio.run(judges.aclose())
    assert first.client.is_closed()
