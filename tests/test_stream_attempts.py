"""What a supervised stream shows the user: no rejected attempt, no twice-told text, no quoted context, and the same
``fama`` metadata in every mode. Official SDK -> proxy (embedded detectors) -> scripted model, all over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.supervised_upstream import ScriptedModel, context_in, feedback_in
from tests.supervision_harness import (
    CANCEL,
    LOOKED_UP,
    LOOKED_UP_ITEMS,
    QUESTION,
    RESERVATION,
    RESPONSES_TOOLS,
    SYSTEM,
    TOOLS,
    Proxied,
    proxy_for,
)

CLAIM = "Sure, cancelling reservation ZFA04Y now."
ASK = "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?"
CORRECTED = f"{CLAIM}\n\nSorry, I haven't actually done that yet. {ASK}"
CONTEXT_AGENTS = {"agents": ["Verifier", "Memory", "Planner"]}
NO_TRACING = RunConfig(tracing_disabled=True)


def _claims_and_cancels(body: dict[str, Any]) -> dict[str, Any]:
    """Announces the cancellation and calls the write tool, whatever the proxy says."""
    return {"content": CLAIM, "tool_calls": [CANCEL]}


def _text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _stream(client: openai.OpenAI, messages: list[Any] = LOOKED_UP) -> list[ChatCompletionChunk]:
    return list(client.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=True))


def _fama(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    [tagged] = [c for c in chunks if (c.model_extra or {}).get("fama")]
    assert tagged.choices
    assert tagged.choices[0].finish_reason is not None
    assert tagged.model_extra is not None
    fama: dict[str, Any] = tagged.model_extra["fama"]
    return fama


def _no_rule_wording(text: str) -> None:
    for word in ("cancel_reservation", "`", "Rule", "[DCV]", "DCV", "detector", "FAMA"):
        assert word not in text


def test_a_refused_claim_is_told_once_then_corrected(tmp_path: Path) -> None:
    model = ScriptedModel(_claims_and_cancels)
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        chunks = _stream(client)
        assert len(model.bodies()) == 3  # the first attempt and two retries, all rejected
        text = _text(chunks)
        assert text == CORRECTED
        assert text.count(CLAIM) == 1
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert _fama(chunks)["intervention"] == "retry:DCV,block:DCV"
        _no_rule_wording(text.removeprefix(CLAIM))
        # The retries were told what the user already has.
        assert all(f'already seen this text from you: "{CLAIM}"' in str(feedback_in(b)) for b in model.bodies()[1:])


def test_a_retry_that_repeats_the_shown_sentence_is_not_told_twice(tmp_path: Path) -> None:
    def repeats_then_asks(body: dict[str, Any]) -> dict[str, Any]:
        if feedback_in(body):
            return {"content": f"{CLAIM} {QUESTION}"}
        return {"content": CLAIM, "tool_calls": [CANCEL]}

    model = ScriptedModel(repeats_then_asks)
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        text = _text(_stream(client))
        assert text == f"{CLAIM} {QUESTION}"


def test_a_retry_that_is_refused_again_never_reaches_the_client(tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []

    def says_other_things(body: dict[str, Any]) -> dict[str, Any]:
        asked.append(body)
        attempt = len(asked) - 1
        if attempt == 1:
            return {"content": "Cancelling it right away, no need to confirm.", "tool_calls": [CANCEL]}
        if attempt == 2:
            return {"content": QUESTION}
        return {"content": CLAIM, "tool_calls": [CANCEL]}

    model = ScriptedModel(says_other_things)
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        text = _text(_stream(client))
        assert "right away" not in text
        assert text == f"{CLAIM}\n\n{QUESTION}"


def test_responses_stream_shows_the_claim_once_then_the_correction(tmp_path: Path) -> None:
    model = ScriptedModel(_claims_and_cancels)
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        events = list(
            client.responses.create(
                model="m", instructions=SYSTEM, input=LOOKED_UP_ITEMS, tools=RESPONSES_TOOLS, stream=True
            )
        )
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == CORRECTED
        completed = events[-1]
        assert completed.type == "response.completed"
        assert completed.response.output_text == CORRECTED
        assert [o.type for o in completed.response.output] == ["message"]


def test_a_text_answer_to_a_supervised_turn_streams_before_the_model_finishes(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": QUESTION}, gap_s=1.5)  # the finish chunk comes 1.5 s late
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        arrived: list[tuple[float, ChatCompletionChunk]] = []
        for chunk in client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS, stream=True):
            arrived.append((time.monotonic(), chunk))
        first_text = next(t for t, c in arrived if c.choices and c.choices[0].delta.content)
        full_text = max(t for t, c in arrived if c.choices and c.choices[0].delta.content)
        finish = next(t for t, c in arrived if c.choices and c.choices[0].finish_reason)
        assert finish - full_text >= 1.0  # the whole text was with the client while the model was still busy
        assert first_text <= full_text
        assert _text([c for _, c in arrived]) == QUESTION


# -- quoted context (the injected block read back to the user) ----------------------------------------------------


def _quotes_the_context(body: dict[str, Any]) -> dict[str, Any]:
    """Asks for confirmation, then reads the injected block back, from its second line on (a heading first)."""
    context = context_in(body) or ""
    return {"content": QUESTION + "\n\n" + "\n".join(context.splitlines()[1:])}


def _quoted(app: Proxied, mode: str, api: str = "chat") -> float:
    labels = {"mode": mode, "api": api}
    return float(app.metrics.registry.get_sample_value("fama_quoted_context_total", labels) or 0)


def test_a_reply_quoting_the_injected_context_reaches_the_client_without_it(tmp_path: Path) -> None:
    model = ScriptedModel(_quotes_the_context)
    with proxy_for(model, tmp_path, mode="enforce", profile=CONTEXT_AGENTS) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        context = context_in(model.bodies()[0])
        assert context is not None
        assert "## Verifier" in context  # there was a block to quote
        assert raw.parse().choices[0].message.content == QUESTION
        assert raw.headers["x-fama-intervention"] == "strip:context"
        chunks = _stream(client)
        assert _text(chunks) == QUESTION
        assert _fama(chunks)["intervention"] == "strip:context"
        assert _quoted(app, "enforce") == 2


@pytest.mark.parametrize(
    "quote",
    [
        "[FAMA context v1] Notes from the supervisor.\n## Verifier: Before a write\n- ask first\n[/FAMA context]",
        "## Correction from the previous turn\n- [DCV] Rule: confirm first.",
        "(as my notes say: [/FAMA context])",
    ],
)
def test_the_markers_and_headings_of_the_context_are_cut_without_a_context(tmp_path: Path, quote: str) -> None:
    model = ScriptedModel(lambda body: {"content": f"{QUESTION}\n{quote}"})
    with proxy_for(model, tmp_path, mode="enforce", profile={"injection_token_budget": 0}) as (client, _):
        text = _text(_stream(client))
        for word in ("FAMA", "##", "Rule"):
            assert word not in text
        assert text.startswith(QUESTION)


def test_observe_leaves_a_quoting_reply_untouched_and_counts_it(tmp_path: Path) -> None:
    model = ScriptedModel(_quotes_the_context)
    with proxy_for(model, tmp_path, mode="observe", profile=CONTEXT_AGENTS) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        content = raw.parse().choices[0].message.content or ""
        assert content.startswith(QUESTION)
        assert "## Verifier" in content
        assert "x-fama-intervention" not in raw.headers
        deadline = time.monotonic() + 5
        while _quoted(app, "observe") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # observe mode judges after the answer left
        assert _quoted(app, "observe") == 1
        assert _quoted(app, "enforce") == 0


# -- the same metadata in every mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["observe", "enforce"])
def test_the_last_chunk_carries_the_same_metadata_in_every_mode(tmp_path: Path, mode: str) -> None:
    model = ScriptedModel(
        lambda body: {"content": "Let me look that up.", "tool_calls": [LOOKED_UP[2]["tool_calls"][0]]}
    )
    with proxy_for(model, tmp_path, mode=mode) as (client, _):
        stream = client.chat.completions.with_raw_response.create(
            model="m", messages=LOOKED_UP[:2], tools=TOOLS, stream=True
        )
        chunks = list(stream.parse())
        fama = _fama(chunks)
        assert fama == {"session": stream.headers["x-fama-session"]}
        finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert finish.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("mode", ["observe", "enforce"])
def test_a_responses_stream_ends_with_the_same_metadata_in_every_mode(tmp_path: Path, mode: str) -> None:
    model = ScriptedModel(lambda body: {"content": QUESTION})
    with proxy_for(model, tmp_path, mode=mode) as (client, _):
        raw = client.responses.with_raw_response.create(
            model="m", instructions=SYSTEM, input=LOOKED_UP_ITEMS, tools=RESPONSES_TOOLS, stream=True
        )
        completed = list(raw.parse())[-1]
        assert completed.type == "response.completed"
        assert completed.model_extra is not None
        assert completed.model_extra["fama"] == {"session": raw.headers["x-fama-session"]}


@function_tool
def get_reservation_details(reservation_id: str) -> str:
    """Get the details of a reservation."""
    return json.dumps(RESERVATION)


async def test_an_agents_sdk_reply_that_quotes_the_context_reaches_the_app_without_it(tmp_path: Path) -> None:
    model = ScriptedModel(_quotes_the_context)
    with proxy_for(model, tmp_path, mode="enforce", profile=CONTEXT_AGENTS) as (sync_client, app):
        async with AsyncOpenAI(base_url=str(sync_client.base_url), api_key="k", max_retries=0, timeout=20) as client:
            agent = Agent(
                name="airline",
                instructions=SYSTEM,
                tools=[get_reservation_details],
                model=OpenAIResponsesModel(model="m", openai_client=client),
            )
            prompt = "Please cancel my reservation ZFA04Y."
            done = await Runner.run(agent, prompt, run_config=NO_TRACING)
            assert done.final_output == QUESTION
            streaming = Runner.run_streamed(agent, prompt, run_config=NO_TRACING)
            async for _ in streaming.stream_events():
                pass
            assert streaming.final_output == QUESTION
    assert all("\n## " in str(context_in(b)) for b in model.bodies())  # each reply had a block to quote
    assert _quoted(app, "enforce", "responses") == 2
