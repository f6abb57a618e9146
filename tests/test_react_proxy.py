"""A ReAct agent through the proxy: official SDK → proxy (uvicorn) → scripted model writing its actions as text.

The agent's harness (tau-bench's ReAct agent) declares no tools in the request: the tools are in its prompt, the
model answers ``Thought: ...`` / ``Action:`` and a JSON object, and tool results come back as user messages
(``API output: ...``). The proxy reads those actions for supervision and never turns them into tool calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detector_service.contract.textactions import react_action, react_respond, react_text
from tests.supervised_upstream import ScriptedModel, feedback_in
from tests.supervision_harness import RESERVATION, SYSTEM, TOOLS, interventions, proxy_for

REACT_PROMPT = (
    f"{SYSTEM}\n\nAnswer in this format:\nThought: <your reasoning>\nAction:\n"
    '{"name": <a tool name or "respond">, "arguments": <its arguments>}'
)
LOOKED_UP: list[Any] = [
    {"role": "system", "content": REACT_PROMPT},
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "role": "assistant",
        "content": react_text("get_reservation_details", {"reservation_id": "ZFA04Y"}, "Look the reservation up."),
    },
    {"role": "user", "content": "API output: " + json.dumps(RESERVATION)},
]
CANCEL = react_text("cancel_reservation", {"reservation_id": "ZFA04Y"}, "The user wants it cancelled.")
ASK = react_respond(
    "Reservation ZFA04Y (flight HAT136) will be cancelled. Do you confirm? (yes/no)", "I must ask for a yes first."
)
ENFORCE = {"mode": "enforce"}


def _feedback(body: dict[str, Any]) -> str | None:
    """The proxy's feedback on a retry: a user message, as the harness feeds everything back."""
    return feedback_in(body, role="user")


def cancels_until_told(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": ASK if _feedback(body) else CANCEL}


def always_cancels(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": CANCEL}


def test_enforce_retries_an_unconfirmed_text_write_and_the_agent_asks_first(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP)
        completion = raw.parse()
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        message = completion.choices[0].message
        assert message.content == ASK  # the retried answer, as the model wrote it
        assert message.tool_calls is None
        assert completion.choices[0].finish_reason == "stop"
        first, retry = model.bodies()
        assert "tools" not in first
        assert "tools" not in retry
        feedback = _feedback(retry)
        assert feedback is not None
        assert "cancel_reservation" in feedback
        assert '"respond"' in feedback  # how to ask the user, in the harness's own terms
        assert [m["role"] for m in retry["messages"]][-2:] == ["user", "user"]  # the API output, then the feedback
        [held] = interventions(app)
        assert held.action.value == "retry"
        assert held.original["content"] == CANCEL


def test_enforce_blocks_with_a_respond_action_when_retries_run_out(tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP)
        completion = raw.parse()
        assert "block:DCV" in raw.headers["x-fama-intervention"]
        message = completion.choices[0].message
        assert message.tool_calls is None
        assert message.content is not None
        action = react_action(message.content)
        assert action is not None
        assert action.call is not None
        assert action.call["name"] == "respond"
        said = action.call["arguments"]["content"]
        assert said == "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?"
        assert len(model.bodies()) == 3  # the first attempt and two retries (max_retries 2)


def test_enforce_holds_a_streamed_text_action_and_sends_the_corrected_one(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        chunks = list(client.chat.completions.create(model="m", messages=LOOKED_UP, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ASK  # the rejected cancel action never reached the client
        assert not [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert len(model.bodies()) == 2


def test_observe_passes_the_text_action_unchanged(tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path) as (client, app):
        for tools in (None, TOOLS):  # also when the harness declares its tools: no text becomes a tool call
            extra: dict[str, Any] = {"tools": tools} if tools else {}
            raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, **extra)
            completion = raw.parse()
            assert "x-fama-intervention" not in raw.headers
            assert "x-fama-repaired" not in raw.headers
            assert completion.choices[0].message.content == CANCEL
            assert completion.choices[0].message.tool_calls is None
            assert completion.choices[0].finish_reason == "stop"
        assert len(model.bodies()) == 2  # no retries in observe mode
        assert interventions(app) == []


def test_a_declared_react_dialect_is_supervised_from_the_first_turn(tmp_path: Path) -> None:
    first = LOOKED_UP[:2]  # no action of the agent yet: only the profile says how it writes them
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, profile={"dialect": "react"}, **ENFORCE) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=first)
        # unconfirmed, and on a reservation never looked up
        assert raw.headers["x-fama-intervention"].split(",") == ["retry:DCV", "retry:WRCO"]
        assert raw.parse().choices[0].message.content == ASK
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):  # auto: not yet recognizable, passed through
        raw = client.chat.completions.with_raw_response.create(model="m", messages=first)
        assert "x-fama-intervention" not in raw.headers
        assert raw.parse().choices[0].message.content == CANCEL
