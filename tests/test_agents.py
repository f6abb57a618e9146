"""The deterministic context builders, on recorded tau-bench airline conversations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.agents import PolicyCache, build_notes, memory, outputs, planner
from detector_service.agents.note import Note
from detector_service.agents.view import ConversationView, is_confirmation, tool_kind
from detector_service.contract.extraction import policy_hash
from detector_service.contract.profile import AgentName, Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.turn import ConversationIndex

pytestmark = pytest.mark.tau

V1 = "tau-bench__airline__gpt-4o__tool-calling__main.jsonl"
V2 = "tau2-bench__airline__qwen2.5-7b__base50__gym.jsonl"


def _records(tau_dir: Path, name: str) -> list[dict[str, Any]]:
    with (tau_dir / "trajectories" / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _tools(tau_dir: Path, domain: str = "tau1-airline") -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = json.loads((tau_dir / "domains" / domain / "tools_openai.json").read_text())
    return tools


def _find(tau_dir: Path, task_id: int, trial: int) -> list[dict[str, Any]]:
    rec = next(r for r in _records(tau_dir, V1) if r["task_id"] == task_id and r["trial"] == trial)
    messages: list[dict[str, Any]] = rec["messages"]
    return messages


def _before_call(messages: list[dict[str, Any]], tool: str) -> int:
    """Index of the first assistant message that calls ``tool``: the conversation up to it is the context."""
    return next(
        i for i, m in enumerate(messages) if any(c["function"]["name"] == tool for c in m.get("tool_calls") or [])
    )


def _notes(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[AgentName, Note]:
    notes = build_notes(list(AgentName), messages, tools, Profile(), PolicyCache())
    return {n.agent: n for n in notes}


def test_before_a_confirmed_cancellation(tau_dir: Path) -> None:
    # Task 27: the user names two reservations, one is refused by policy, then "Yes, please ... cancel NQNU5R".
    messages = _find(tau_dir, 27, 0)
    cut = _before_call(messages, "cancel_reservation")
    notes = _notes(messages[:cut], _tools(tau_dir))

    tsa = notes[AgentName.TSA]
    assert tsa.lines[0].startswith("`cancel_reservation` (write)")
    assert "'cancel'" in tsa.lines[0]

    dce = "\n".join(notes[AgentName.DCE].lines)
    assert "explicit user confirmation" in dce
    assert "reason for cancellation" in dce

    verifier = notes[AgentName.VERIFIER].lines
    assert "`cancel_reservation`" in verifier[0]
    assert verifier[1].startswith("[x]")  # the latest user message says yes
    assert "NQNU5R" in verifier[2]

    facts = "\n".join(notes[AgentName.MEMORY].lines)
    assert "user_id: aarav_ahmed_6699" in facts
    assert "reservation_id: IFOYYZ, NQNU5R" in facts


def test_verifier_sees_no_confirmation_in_a_request(tau_dir: Path) -> None:
    # Task 28 trial 0: "I would like to cancel all of these reservations" is a request, not a confirmation.
    messages = _find(tau_dir, 28, 0)
    cut = _before_call(messages, "cancel_reservation")
    verifier = _notes(messages[:cut], _tools(tau_dir))[AgentName.VERIFIER].lines
    assert verifier[1].startswith("[ ]")
    assert verifier[-1].startswith("Not confirmed yet")


def test_tor_enumerates_every_record_of_the_latest_output(tau_dir: Path) -> None:
    messages = _find(tau_dir, 0, 0)
    cut = _before_call(messages, "search_direct_flight") + 2  # the call and its output
    output = json.loads(messages[cut - 1]["content"])
    tor = _notes(messages[:cut], _tools(tau_dir))[AgentName.TOR]
    assert "search_direct_flight" in tor.title
    assert len(tor.lines) == len(output)
    for i, flight in enumerate(output):
        line = tor.lines[i]
        assert line.startswith(f"{i + 1}: flight_number={flight['flight_number']}")
        assert f"prices.economy={flight['prices']['economy']}" in line
        assert f"status={flight['status']}" in line


def test_tor_splits_a_record_with_nested_collections() -> None:
    value = {
        "reservation_id": "ABC123",
        "status": "booked",
        "flights": [{"flight_number": "F1", "price": 10}, {"flight_number": "F2", "price": 20}],
        "payment_methods": {"card_1": {"id": "card_1", "last_four": "1111"}, "gift_2": {"id": "gift_2", "amount": 5}},
    }
    lines = outputs.flatten(value)
    assert lines[0].startswith("reservation_id=ABC123; status=booked")
    assert lines[1] == "flights[1]: flight_number=F1; price=10"
    assert lines[3] == "payment_methods.card_1: id=card_1; last_four=1111"
    assert not outputs.is_complex({"ok": True})


def test_planner_marks_a_request_done_after_the_write_succeeded(tau_dir: Path) -> None:
    messages = _find(tau_dir, 27, 0)
    cut = _before_call(messages, "cancel_reservation")
    view = ConversationView.build(messages[: cut + 2], _tools(tau_dir), Profile())  # call and its output
    found = planner.requests(view)
    cancel = [(i, s) for i, s in found if "cancel two" in s]
    assert cancel
    assert planner.is_done(view, Profile(), *cancel[0])
    before = ConversationView.build(messages[:cut], _tools(tau_dir), Profile())
    assert not planner.is_done(before, Profile(), *cancel[0])


def test_memory_records_write_outcomes_and_confirmations(tau_dir: Path) -> None:
    messages = _find(tau_dir, 0, 0)  # a booking that first fails on the payment amount
    cut = _before_call(messages, "book_reservation")
    view = ConversationView.build(messages[: cut + 2], _tools(tau_dir), Profile())
    writes = memory.writes(view, Profile())
    assert len(writes) == 1
    assert writes[0].startswith("`book_reservation`(")
    assert "failed: Error: payment amount does not add up" in writes[0]
    confirmed = memory.confirmations(view)
    assert confirmed
    assert "Yes, please proceed" in confirmed[-1]
    assert "$255" in confirmed[-1]


def test_policy_extraction_is_cached_per_policy_text(tau_dir: Path) -> None:
    cache = PolicyCache(max_entries=2)
    tools = _tools(tau_dir)
    records = _records(tau_dir, V1)[:5]
    for rec in records:
        build_notes([AgentName.DCE], rec["messages"], tools, Profile(), cache)
    assert len(cache) == 1  # one airline policy, indexed once
    policy = records[0]["messages"][0]["content"]
    assert cache.get(policy) is cache.get(policy)
    assert len(policy_hash(policy)) == 64


def test_every_recorded_turn_builds_deterministically(tau_dir: Path) -> None:
    """All agents over every assistant decision point of both recorded runs: no crash, same output twice."""
    cache = PolicyCache()
    seen: set[AgentName] = set()
    for name, domain in ((V1, "tau1-airline"), (V2, "tau2-airline")):
        tools = _tools(tau_dir, domain)
        for rec in _records(tau_dir, name)[::3]:
            messages = rec["messages"]
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                first = build_notes(list(AgentName), messages[:i], tools, Profile(), cache)
                assert first == build_notes(list(AgentName), messages[:i], tools, Profile(), cache)
                seen.update(n.agent for n in first)
    assert seen == set(AgentName)


def test_tool_kinds_follow_profile_then_annotations_then_names(tau_dir: Path) -> None:
    declared = {
        t["name"]: t["kind"] for t in json.loads((tau_dir / "domains" / "tau2-airline" / "tools.json").read_text())
    }
    for name, kind in declared.items():
        assert tool_kind(name, Profile()).value == kind, name
    profile = Profile(tools={"cancel_reservation": ToolKind.READ})
    assert tool_kind("cancel_reservation", profile) is ToolKind.READ
    annotated = {"type": "function", "function": {"name": "frobnicate"}, "annotations": {"destructiveHint": True}}
    assert tool_kind("frobnicate", Profile(), annotated) is ToolKind.WRITE


def test_confirmation_phrases() -> None:
    assert is_confirmation("Yes, please go ahead.")
    assert is_confirmation("Oui, please proceed with canceling this reservation.")
    assert not is_confirmation("No, don't do that yet.")
    assert not is_confirmation("I would like to cancel all of these reservations.")


def test_the_agents_view_pairs_outputs_with_calls_as_the_detectors_index_does() -> None:
    def call(call_id: str, name: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}

    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Look up my order and my profile"},
        {"role": "assistant", "content": None, "tool_calls": [call("a", "get_order"), call("b", "get_user")]},
        {"role": "tool", "tool_call_id": "b", "content": "user U1"},
        {"role": "tool", "content": "an output that names no call"},  # the latest call is answered: it pairs nowhere
    ]
    view = ConversationView.build(messages, [], Profile())
    index = ConversationIndex.build(messages, ToolKinds(Profile(), []))
    assert [(c.name, c.output) for c in view.calls] == [(c.name, c.result) for c in index.calls]
    assert [c.output for c in view.calls] == [None, "user U1"]
