"""Responses turns are supervised like chat turns, on the bridged path: official SDK -> proxy (enforce, embedded
detectors) -> scripted chat-only model. An unconfirmed write is corrected; the confirmed one goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2

from detector_service.contract.wire import Action, Category
from tests.supervised_upstream import ScriptedModel, context_in, feedback_in
from tests.supervision_harness import (
    CANCEL,
    QUESTION,
    RESERVATION,
    SYSTEM,
    TOOLS,
    Proxied,
    cancels_until_told,
    interventions,
    proxy_for,
)

RESPONSES_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]
LOOKED_UP: list[Any] = [
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "type": "function_call",
        "call_id": "call_0",
        "name": "get_reservation_details",
        "arguments": '{"reservation_id": "ZFA04Y"}',
    },
    {"type": "function_call_output", "call_id": "call_0", "output": json.dumps(RESERVATION)},
]
YES: list[Any] = [{"role": "user", "content": "Yes, please go ahead and cancel it."}]


def _calls(output: list[Any]) -> list[str]:
    return [o.name for o in output if o.type == "function_call"]


def _retries(proxied: Proxied, outcome: str) -> float | None:
    value = proxied.metrics.registry.get_sample_value("fama_retries_total", {"category": "DCV", "outcome": outcome})
    return float(value) if value is not None else None


def test_unconfirmed_write_is_corrected_and_the_confirmed_one_goes_through(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, mode="enforce") as (client, app):
        first = client.responses.with_raw_response.create(
            model="m", instructions=SYSTEM, input=LOOKED_UP, tools=RESPONSES_TOOLS
        )
        asked = first.parse()
        assert first.headers["x-fama-intervention"] == "retry:DCV"
        assert asked.output_text == QUESTION
        assert _calls(asked.output) == []
        assert asked.usage is not None
        assert asked.usage.total_tokens == 30  # both attempts are paid for
        rejected, retry = model.bodies()
        assert feedback_in(rejected) is None
        assert "cancel_reservation" in str(feedback_in(retry))

        second = client.responses.with_raw_response.create(
            model="m", instructions=SYSTEM, input=YES, tools=RESPONSES_TOOLS, previous_response_id=asked.id
        )
        confirmed = second.parse()
        assert "x-fama-intervention" not in second.headers
        assert second.headers["x-fama-session"] == first.headers["x-fama-session"]
        assert _calls(confirmed.output) == ["cancel_reservation"]
        # The model saw the whole chain: the look-up, the question it was corrected to ask, the user's yes.
        sent = model.bodies()[-1]["messages"]
        assert [m["role"] for m in sent if not str(m.get("content") or "").startswith("[FAMA")] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "user",
        ]
        assert QUESTION in [m.get("content") for m in sent]

        [recorded] = interventions(app)
        assert recorded.action is Action.RETRY
        assert recorded.categories == [Category.DCV]
        assert _retries(app, "fixed") == 1
        registry = app.metrics.registry
        labels = {"action": "retry", "category": "DCV", "mode": "enforce"}
        assert registry.get_sample_value("fama_interventions_total", {**labels, "api": "responses"}) == 1
        assert registry.get_sample_value("fama_interventions_total", {**labels, "api": "chat"}) == 0
        turns = {"intervened": "yes", "finish_reason": "tool_calls", "api": "responses"}
        assert registry.get_sample_value("fama_session_turns_total", turns) == 1  # the confirmed write


def test_streamed_unconfirmed_write_never_reaches_the_client_and_the_confirmed_one_does(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, mode="enforce") as (client, app):
        with client.responses.stream(model="m", instructions=SYSTEM, input=LOOKED_UP, tools=RESPONSES_TOOLS) as stream:
            events = list(stream)
            asked = stream.get_final_response()
        kinds = [e.type for e in events]
        assert not any(k.startswith("response.function_call") for k in kinds)
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == QUESTION
        assert asked.output_text == QUESTION
        assert _calls(asked.output) == []
        assert events[-1].type == "response.completed"
        assert len({e.response.id for e in events if hasattr(e, "response")}) == 1

        with client.responses.stream(
            model="m", instructions=SYSTEM, input=YES, tools=RESPONSES_TOOLS, previous_response_id=asked.id
        ) as stream:
            kinds = [e.type for e in stream]
            confirmed = stream.get_final_response()
        assert "response.function_call_arguments.done" in kinds
        assert _calls(confirmed.output) == ["cancel_reservation"]
        assert confirmed.previous_response_id == asked.id
        assert _retries(app, "fixed") == 1


def test_function_call_is_held_until_the_verdict_while_text_flows(tmp_path: Path) -> None:
    """A text run before the call reaches the client before the model has even finished its call."""

    def talks_then_cancels(body: dict[str, Any]) -> dict[str, Any]:
        if feedback_in(body):
            return {"content": QUESTION}
        return {"content": "Cancelling now.", "tool_calls": [cancels_until_told(body)["tool_calls"][0]]}

    model = ScriptedModel(talks_then_cancels, gap_s=0.5)
    with proxy_for(model, tmp_path, mode="enforce") as (client, _):
        base = str(client.base_url).rstrip("/")
        body = {"model": "m", "instructions": SYSTEM, "input": LOOKED_UP, "tools": RESPONSES_TOOLS, "stream": True}
        with httpx2.stream("POST", base + "/responses", json=body, timeout=20) as raw:
            lines = raw.iter_lines()
            seen: list[str] = []
            for line in lines:
                if line.startswith("data: "):
                    seen.append(json.loads(line.removeprefix("data: "))["type"])
                    if seen[-1] == "response.output_text.delta":
                        break
            # The first text delta came while the model still paused before its call: nothing of a call yet.
            assert not any(k.startswith("response.function_call") for k in seen)
            rest = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        assert rest[-1]["type"] == "response.completed"
        assert rest[-1]["fama"]["intervention"] == "retry:DCV"  # the stream's headers left before the verdict
        final = rest[-1]["response"]
        assert [o["type"] for o in final["output"]] == ["message"]
        text = final["output"][0]["content"][0]["text"]
        assert text.startswith("Cancelling now.")  # already with the client when the call was rejected
        assert text.endswith(QUESTION)


def test_observe_guidance_reaches_the_next_turn_of_the_chain_and_its_outcome_is_taken(tmp_path: Path) -> None:
    def cancels(body: dict[str, Any]) -> dict[str, Any]:
        if "cancelled" in str(body["messages"][-1].get("content")):
            return {"content": "Done."}
        return {"tool_calls": [CANCEL]}

    model = ScriptedModel(cancels)
    with proxy_for(model, tmp_path, mode="observe") as (client, _):
        first = client.responses.with_raw_response.create(
            model="m", instructions=SYSTEM, input=LOOKED_UP, tools=RESPONSES_TOOLS
        )
        hasty = first.parse()
        assert "x-fama-intervention" not in first.headers  # observe: untouched
        assert _calls(hasty.output) == ["cancel_reservation"]
        [cancel] = [o for o in hasty.output if o.type == "function_call"]
        client.responses.create(
            model="m",
            instructions=SYSTEM,
            tools=RESPONSES_TOOLS,
            previous_response_id=hasty.id,
            input=[{"type": "function_call_output", "call_id": cancel.call_id, "output": '{"status": "cancelled"}'}],
        )
        context = context_in(model.bodies()[-1])
        assert context is not None
        assert "## Correction from the previous turn" in context
        assert "[DCV]" in context

        session = first.headers["x-fama-session"]
        reported = httpx2.post(
            str(client.base_url) + f"fama/sessions/{session}/outcome", json={"outcome": "failure"}, timeout=10
        )
        assert reported.status_code == 200, reported.text
        assert reported.json()["session_id"] == session


def test_structured_output_through_text_format(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Booking(BaseModel):
        reservation_id: str
        seats: int

    model = ScriptedModel(lambda body: {"content": json.dumps({"reservation_id": "ZFA04Y", "seats": 2})})
    with proxy_for(model, tmp_path) as (client, _):
        parsed = client.responses.parse(model="m", input="Which booking?", text_format=Booking)
        assert parsed.output_parsed == Booking(reservation_id="ZFA04Y", seats=2)
        sent = model.bodies()[-1]["response_format"]
        assert sent["type"] == "json_schema"
        assert sent["json_schema"]["name"] == "Booking"
        assert sent["json_schema"]["schema"]["required"] == ["reservation_id", "seats"]
