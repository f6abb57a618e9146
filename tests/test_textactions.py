"""Text-action dialects on real runs: tau-bench's ReAct agent (grok-4-fast, airline) read as native calls.

Its harness writes every action as ``Thought: ...`` / ``Action:`` and a JSON object, ``respond`` for words to the
user, and feeds tool results back as user messages opening with ``API output:``; the records hold no tool_calls.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.profile import Dialect, Profile, load_profile
from detector_service.contract.textactions import (
    RESPOND,
    native_turn,
    react_action,
    react_respond,
    resolve,
    split_text_calls,
    text_calls,
    tool_result,
)
from detector_service.contract.wire import Action, Category
from detector_service.engine import Engine
from detector_service.offline.replay import replay_one
from detector_service.offline.trajectories import load
from detector_service.turn import tools_by_name
from proxy.upstream.textcalls import leaked_calls
from tests.tau_turns import REACT, V1, tools, trajectory, turn

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.tau


def _names(tau_dir: Path) -> frozenset[str]:
    return frozenset(tools_by_name(tools(tau_dir, REACT)))


def test_actions_respond_and_api_outputs_become_native_turns(tau_dir: Path) -> None:
    t = trajectory(tau_dir, REACT, "0#0")
    dialect, native, _ = native_turn(Dialect.AUTO, t.messages, None, _names(tau_dir))
    assert dialect is Dialect.REACT
    assert len(native) == len(t.messages)  # message for message: turn indexes are the recorded ones
    # 2: a respond action is the agent's words to the user, without its thought
    said = json.loads(t.messages[2]["content"].split("Action:")[-1])["arguments"]["content"]
    assert native[2] == {"role": "assistant", "content": said}
    # 4: a look-up, written as text, is a native call; 5: its "API output:" is the tool's answer to it
    assert native[4]["content"] is None
    [call] = native[4]["tool_calls"]
    assert call["function"]["name"] == "search_direct_flight"
    assert json.loads(call["function"]["arguments"]) == {"origin": "JFK", "destination": "SEA", "date": "2024-05-20"}
    assert t.messages[5]["content"].startswith("API output: [")
    assert native[5]["role"] == "tool"
    assert native[5]["tool_call_id"] == call["id"]
    assert native[5]["content"] == t.messages[5]["content"].removeprefix("API output: ")
    # the user's own words stay the user's turns
    assert native[7] == t.messages[7]
    assert native[7]["role"] == "user"
    # the write the run made, after the user's "yes"
    assert t.messages[27]["content"] == "yes"
    assert [c["function"]["name"] for c in native[28]["tool_calls"]] == ["book_reservation"]
    assert native[29]["role"] == "tool"


def test_an_action_that_does_not_parse_is_the_text_the_user_got(tau_dir: Path) -> None:
    # 8#0 writes its look-ups with one closing brace too many: the harness cannot parse them and sends them to the
    # user as they are, and the user answers them.
    t = trajectory(tau_dir, REACT, "8#0")
    action = react_action(t.messages[10]["content"])
    assert action is not None
    assert action.call is None
    assert action.rest.startswith('{"name": "search_direct_flight"')
    _, native, _ = native_turn(Dialect.AUTO, t.messages, None, _names(tau_dir))
    assert native[10] == {"role": "assistant", "content": action.rest}
    assert native[11] == t.messages[11]  # the user's reply to it, not a tool result


def test_auto_reads_native_runs_as_they_are_and_declared_dialects_win(tau_dir: Path) -> None:
    native_run = trajectory(tau_dir, V1, "0#0")
    names = frozenset(tools_by_name(tools(tau_dir, V1)))
    assert resolve(Dialect.AUTO, native_run.messages, None, names) is Dialect.NATIVE
    assert native_turn(Dialect.AUTO, native_run.messages, None, names)[1] == native_run.messages
    react_run = trajectory(tau_dir, REACT, "0#0")
    assert resolve(Dialect.NATIVE, react_run.messages, None, _names(tau_dir)) is Dialect.NATIVE
    # the first turn of a ReAct conversation shows its dialect in the candidate alone
    first = react_run.messages[:2]
    assert resolve(Dialect.AUTO, first, None, _names(tau_dir)) is Dialect.NATIVE
    assert resolve(Dialect.AUTO, first, react_run.messages[2], _names(tau_dir)) is Dialect.REACT


def test_the_json_in_text_forms_are_read_too() -> None:
    names = {"cancel_reservation"}
    fenced = (
        'I will cancel it now.\n```json\n{"name": "cancel_reservation", "arguments": {"reservation_id": "X1"}}\n```'
    )
    assert text_calls({"role": "assistant", "content": fenced}, names) == (
        "I will cancel it now.",
        [{"name": "cancel_reservation", "arguments": {"reservation_id": "X1"}}],
    )
    langchain = 'Thought: cancel it\nAction: cancel_reservation\nAction Input: {"reservation_id": "X1"}'
    found = text_calls({"role": "assistant", "content": langchain}, names)
    assert found == (None, [{"name": "cancel_reservation", "arguments": {"reservation_id": "X1"}}])
    # what a block sends a ReAct agent's client reads back as a respond action
    action = react_action(react_respond("Please confirm: yes or no?", "waiting for the user"))
    assert action is not None
    assert action.call == {"name": "respond", "arguments": {"content": "Please confirm: yes or no?"}}


def test_the_proxy_leaves_a_react_action_as_text_and_repairs_a_leaked_call(tau_dir: Path) -> None:
    names = _names(tau_dir)
    text = trajectory(tau_dir, REACT, "0#0").messages[28]["content"]
    assert split_text_calls(text, names) is not None  # its JSON alone would read as a call ...
    assert leaked_calls(text, names) is None  # ... but the harness reads the Action itself
    bare = text.split("Action:")[-1].strip()
    found = leaked_calls(bare, names)
    assert found is not None
    assert [c["name"] for c in found[1]] == ["book_reservation"]


def test_a_write_before_the_users_yes_is_flagged_and_the_same_write_after_it_is_not(tau_dir: Path) -> None:
    # 0#0: the agent lists the booking (26), the user says "yes" (27), the agent books (28). The same booking
    # action as the answer to the user's payment choice (25), before any yes:
    t = trajectory(tau_dir, REACT, "0#0")
    for profile in (Profile(), load_profile(ROOT / "profiles" / "airline.yaml")):
        engine = Engine(profile)
        early = engine.evaluate(turn(tau_dir, REACT, "0#0", 26, candidate=t.messages[28]))
        dcv = [f for f in early.findings if f.category is Category.DCV]
        assert dcv
        assert {f.tool_name for f in dcv} == {"book_reservation"}
        assert {f.tool_call_id for f in dcv} == {"text-26"}
        assert early.action in (Action.RETRY, Action.BLOCK)
        assert early.rewritten is None
        recorded = engine.evaluate(turn(tau_dir, REACT, "0#0", 28))
        assert not [f for f in recorded.findings if f.category is Category.DCV]


def test_an_unparsed_write_acts_and_the_claim_after_it_is_caught(tau_dir: Path) -> None:
    engine = Engine(load_profile(ROOT / "profiles" / "airline.yaml"))
    replayed = replay_one(engine, trajectory(tau_dir, REACT, "14#0"), tools(tau_dir, REACT))
    by_turn = {(f.turn, f.finding.detector): f.action for f in replayed.flags}
    # 8: the upgrade (a write) did not parse, so it never ran; 10: the agent tells the user it is done
    assert by_turn[(8, "unparsed_action")] in ("retry", "block")
    assert by_turn[(10, "claimed_without_action")] in ("retry", "block")
    # an unparsed look-up only guides: nothing changed, the user can ask again
    looked_up = replay_one(engine, trajectory(tau_dir, REACT, "8#0"), tools(tau_dir, REACT))
    unparsed = [f for f in looked_up.flags if f.finding.detector == "unparsed_action"]
    assert unparsed
    assert {f.action for f in unparsed} == {"guide"}


def test_replay_flags_the_react_run_only_when_it_reads_its_actions(tau_dir: Path) -> None:
    runs = list(load(tau_dir / "trajectories" / REACT))
    airline = load_profile(ROOT / "profiles" / "airline.yaml")
    read = [replay_one(Engine(airline), t, tools(tau_dir, REACT)) for t in runs]
    blind = [
        replay_one(Engine(airline.model_copy(update={"dialect": Dialect.NATIVE})), t, tools(tau_dir, REACT))
        for t in runs
    ]
    acting = {"retry", "rewrite", "block"}
    assert not any(f.action in acting for r in blind for f in r.flags)
    flagged_failed = [r for r in read if r.trajectory.reward == 0.0 and any(f.action in acting for f in r.flags)]
    assert flagged_failed
    for r in read:
        for f in r.flags:  # a flag's turn is the recorded assistant message
            assert r.trajectory.messages[f.turn]["role"] == "assistant"


def _as_code_actions(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation as a code-action harness writes it: each action a Python-style call in a ```py
    fence after the thought, a message to the user as plain text, tool results as "Observation:" messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text = m.get("content") or ""
        if m["role"] == "assistant" and "Action:" in text:
            thought, action = text.rsplit("Action:", 1)
            try:
                call = json.loads(action)
            except ValueError:
                out.append(m)  # an action that does not parse stays as it was
                continue
            if call["name"] == RESPOND:
                out.append({"role": "assistant", "content": call["arguments"]["content"]})
                continue
            args = ", ".join(f"{k}={v!r}" for k, v in call["arguments"].items())
            out.append({"role": "assistant", "content": f"{thought.strip()}\n```py\n{call['name']}({args})\n```"})
        elif m["role"] == "user" and text.startswith("API output: "):
            out.append({"role": "user", "content": "Observation: " + text.removeprefix("API output: ")})
        else:
            out.append(m)
    return out


def test_a_code_action_harness_is_supervised_like_the_react_one(tau_dir: Path) -> None:
    # The ReAct runs rewritten as a code-action harness writes them: every acting flag lands on the same turn.
    airline = load_profile(ROOT / "profiles" / "airline.yaml")
    compared = 0
    for t in load(tau_dir / "trajectories" / REACT):
        code = dataclasses.replace(t, messages=_as_code_actions(t.messages))
        assert sum("```py" in (m.get("content") or "") for m in code.messages) >= 1, t.id
        react = replay_one(Engine(airline), t, tools(tau_dir, REACT))
        written = replay_one(Engine(airline), code, tools(tau_dir, REACT))
        acting = {"retry", "rewrite", "block"}
        before = sorted((f.turn, f.finding.detector) for f in react.flags if f.action in acting)
        after = sorted((f.turn, f.finding.detector) for f in written.flags if f.action in acting)
        assert after == before, t.id
        compared += bool(before)
    assert compared >= 6


def test_tool_results_handed_back_in_tags_are_tool_results() -> None:
    assert tool_result('<tool_response>\n{"status": "booked"}\n</tool_response>') == '{"status": "booked"}'
    assert tool_result("Observation: []") == "[]"
    assert tool_result("I got <tool_response>x</tool_response> in my mail") is None  # the user's own words
    tagged = [
        {"role": "user", "content": "Cancel ZFA04Y."},
        {"role": "assistant", "content": '<tool_call>{"name": "get_reservation_details", "arguments": {}}</tool_call>'},
        {"role": "user", "content": "<tool_response>{}</tool_response>"},
    ]
    assert resolve(Dialect.AUTO, tagged, None, frozenset({"get_reservation_details"})) is Dialect.TEXT
