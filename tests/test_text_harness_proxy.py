"""A code-action agent through the proxy: official SDK → proxy (uvicorn) → scripted model writing Python-style calls.

Its harness (like smolagents' code agents, or a Llama 3.2 model served without a tool parser) declares no tools in
the request: they are in its prompt and in the deployment's profile. The model writes each call as Python in a
```` ```py ```` fence after its thought, talks to the user in plain text, and gets tool results back as user messages
(``Observation: ...``). The proxy reads those calls for supervision (dialect ``text``), leaves the text as it is, and
answers in the harness's terms: plain text, never a ReAct ``respond`` action.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detector_service.contract.profile import Dialect
from detector_service.contract.textactions import resolve
from tests.supervised_upstream import ScriptedModel, feedback_in
from tests.supervision_harness import QUESTION, RESERVATION, SYSTEM, TOOLS, interventions, proxy_for

PROFILE = {"tools": {"get_reservation_details": "read", "cancel_reservation": "write"}}
NAMES = frozenset(PROFILE["tools"])
LOOKED_UP: list[Any] = [
    {"role": "system", "content": f"{SYSTEM}\nWrite each tool call as Python in a ```py block."},
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "role": "assistant",
        "content": "Thought: look the reservation up.\n```py\nget_reservation_details(reservation_id='ZFA04Y')\n```",
    },
    {"role": "user", "content": "Observation: " + json.dumps(RESERVATION)},
]
CANCEL = "Thought: the user wants it cancelled.\n```py\ncancel_reservation(reservation_id='ZFA04Y')\n```"
ENFORCE = {"mode": "enforce", "profile": PROFILE}


def _feedback(body: dict[str, Any]) -> str | None:
    """The proxy's feedback on a retry: a user message, as the harness feeds everything back."""
    return feedback_in(body, role="user")


def test_the_conversation_reads_as_the_text_dialect() -> None:
    assert resolve(Dialect.AUTO, LOOKED_UP, None, NAMES) is Dialect.TEXT
    assert resolve(Dialect.AUTO, LOOKED_UP, None, frozenset()) is Dialect.NATIVE  # no tool known: plain text
    assert resolve(Dialect.NATIVE, LOOKED_UP, None, NAMES) is Dialect.NATIVE  # a declared dialect wins


def test_enforce_retries_an_unconfirmed_code_call_with_feedback_in_the_harness_terms(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": QUESTION if _feedback(body) else CANCEL})
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP)
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        message = raw.parse().choices[0].message
        assert message.content == QUESTION
        assert message.tool_calls is None
        first, retry = model.bodies()
        assert "tools" not in first
        feedback = _feedback(retry)
        assert feedback is not None
        assert "cancel_reservation" in feedback
        assert "the way you wrote your earlier calls" in feedback
        assert '"respond"' not in feedback  # no ReAct vocabulary for a harness that does not speak it
        [held] = interventions(app)
        assert held.original["content"] == CANCEL


def test_enforce_blocks_with_plain_text_when_retries_run_out(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": CANCEL})
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP)
        assert "block:DCV" in raw.headers["x-fama-intervention"]
        message = raw.parse().choices[0].message
        assert message.content == "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?"
        assert message.tool_calls is None
        assert len(model.bodies()) == 3


def test_observe_leaves_the_code_call_as_text_even_with_declared_tools(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": CANCEL})
    with proxy_for(model, tmp_path, profile=PROFILE) as (client, app):
        extras: list[dict[str, Any]] = [{}, {"tools": TOOLS}]
        for extra in extras:
            raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, **extra)
            assert "x-fama-repaired" not in raw.headers  # its harness runs the call from the text
            completion = raw.parse()
            assert completion.choices[0].message.content == CANCEL
            assert completion.choices[0].message.tool_calls is None
        assert interventions(app) == []


def test_a_declared_text_dialect_is_supervised_from_the_first_turn(tmp_path: Path) -> None:
    first = LOOKED_UP[:2]  # no call of the agent yet: only the profile says how it writes them
    model = ScriptedModel(lambda body: {"content": QUESTION if _feedback(body) else CANCEL})
    declared = {**PROFILE, "dialect": "text"}
    with proxy_for(model, tmp_path, mode="enforce", profile=declared) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=first)
        assert raw.headers["x-fama-intervention"].split(",") == ["retry:DCV", "retry:WRCO"]
        assert raw.parse().choices[0].message.content == QUESTION
