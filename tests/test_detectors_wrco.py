from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from detector_service.contract.wire import Category, Finding, TurnEvent
from detector_service.engine import Engine
from detector_service.offline.trajectories import load_tools
from tests.tau_turns import QWEN, REACT, TELECOM, V1, turn

pytestmark = pytest.mark.tau


def wrco(event: TurnEvent) -> list[Finding]:
    return [f for f in Engine().evaluate(event).findings if f.category is Category.WRCO]


def test_ungrounded_value_in_a_write(tau_dir: Path) -> None:
    found = wrco(turn(tau_dir, QWEN, "15#0", 17))
    assert [f.detector for f in found] == ["ungrounded_value"]
    assert "appears in no earlier tool output or user message" in found[0].message


def test_grounded_write_passes(tau_dir: Path) -> None:
    assert wrco(turn(tau_dir, V1, "0#0", 20)) == []


def test_write_on_unread_entity(tau_dir: Path) -> None:
    found = wrco(turn(tau_dir, QWEN, "7#0", 7))
    assert "write_on_unread_entity" in {f.detector for f in found}


def test_made_up_reservation_id(tau_dir: Path) -> None:
    # The same confirmed cancellation, with an id the conversation never mentioned.
    event = turn(tau_dir, V1, "39#1", 10)
    candidate = copy.deepcopy(event.candidate)
    candidate["tool_calls"][0]["function"]["arguments"] = json.dumps({"reservation_id": "ZZ9QQ7"})
    found = wrco(event.model_copy(update={"candidate": candidate}))
    assert [f.detector for f in found] == ["ungrounded_value"]
    assert "ZZ9QQ7" in found[0].message


def test_value_contradicting_a_tool_output(tau_dir: Path) -> None:
    # A write that pairs the reservation with a user id the reservation record does not have.
    event = turn(tau_dir, V1, "39#1", 10)
    reservation_id = json.loads(event.candidate["tool_calls"][0]["function"]["arguments"])["reservation_id"]
    tools = [*event.tools]
    tools.append(
        {
            "type": "function",
            "function": {
                "name": "cancel_reservation_for_user",
                "parameters": {"type": "object", "properties": {"reservation_id": {}, "user_id": {}}},
            },
        }
    )
    candidate = copy.deepcopy(event.candidate)
    candidate["tool_calls"][0]["function"] = {
        "name": "cancel_reservation_for_user",
        "arguments": json.dumps({"reservation_id": reservation_id, "user_id": "mia_li_3668"}),
    }
    found = wrco(event.model_copy(update={"candidate": candidate, "tools": tools}))
    contradiction = [f for f in found if f.detector == "contradicts_tool_output"]
    assert contradiction, found
    assert "mia_li_3668" in contradiction[0].message


def test_an_order_number_written_with_a_hash_is_the_one_the_user_gave(tau_dir: Path) -> None:
    # Retail order ids are "#W..." in tool arguments; in text the user writes "#W2378156" or "W2378156".
    tools = load_tools(tau_dir / "domains" / "tau2-retail" / "tools_openai.json")
    cancel = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {
                    "name": "cancel_pending_order",
                    "arguments": json.dumps({"order_id": "#W2378156", "reason": "no longer needed"}),
                },
            }
        ],
    }
    for said in ("#W2378156", "W2378156"):
        event = TurnEvent(
            session_id="retail",
            messages=[{"role": "user", "content": f"Please cancel my order {said}, I no longer need it."}],
            tools=tools,
            candidate=cancel,
        )
        # Grounded in the user's words, though never read: the finding is about the missing read, not the value.
        assert [f.detector for f in wrco(event)] == ["write_on_unread_entity"]


def test_changing_an_attribute_is_no_contradiction_but_another_owner_is(tau_dir: Path) -> None:
    # The line record says plan P1 and customer C1001: a call that sets plan P2 changes the plan, one that
    # passes customer C9999 with this line pairs it with someone who does not own it.
    tools = [
        *load_tools(tau_dir / "domains" / "tau2-telecom" / "tools_openai.json"),
        {"type": "function", "function": {"name": "change_plan", "parameters": {"type": "object", "properties": {}}}},
    ]
    line = {"line_id": "L1001", "customer_id": "C1001", "plan_id": "P1", "status": "active"}
    messages = [
        {"role": "user", "content": "Please move line L1001 to plan P2, my customer id is C9999."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "r",
                    "type": "function",
                    "function": {"name": "get_details_by_id", "arguments": '{"id": "L1001"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "r", "content": json.dumps(line)},
    ]

    def found(args: dict[str, str]) -> list[str]:
        call = {"id": "w", "type": "function", "function": {"name": "change_plan", "arguments": json.dumps(args)}}
        event = TurnEvent(
            session_id="t", messages=messages, tools=tools, candidate={"role": "assistant", "tool_calls": [call]}
        )
        return [f.detector for f in wrco(event)]

    assert "contradicts_tool_output" not in found({"line_id": "L1001", "plan_id": "P2"})
    assert "contradicts_tool_output" in found({"line_id": "L1001", "customer_id": "C9999"})


def test_a_write_on_another_entity_than_the_one_the_user_named(tau_dir: Path) -> None:
    # gpt-4o (telecom) resumes line L1001 for a user who gave 555-123-2002 as their number: the tools returned
    # that number for the customer, and L1001's own record holds 555-123-2001. The user's line is another one.
    found = wrco(turn(tau_dir, TELECOM, "[service_issue]overdue_bill_suspension[PERSONA:Easy]#0", 33))
    named = [f for f in found if f.detector == "entity_named_otherwise"]
    assert [f.tool_name for f in named] == ["resume_line"]
    assert named[0].evidence == {
        "key": "line_id",
        "field": "phone_number",
        "held": "555-123-2001",
        "said": "555-123-2002",
    }


def test_the_line_with_the_users_number_is_the_one_they_named(tau_dir: Path) -> None:
    # Two lines read, the user gave the number of the second: a write on it passes, one on the first does not;
    # a field the user never spoke of (the plan) names nothing.
    tools = load_tools(tau_dir / "domains" / "tau2-telecom" / "tools_openai.json")
    lines = [
        {"line_id": "L1", "phone_number": "555-000-0001", "plan_id": "P1"},
        {"line_id": "L2", "phone_number": "555-000-0002", "plan_id": "P2"},
    ]
    messages: list[dict[str, object]] = [{"role": "user", "content": "My number is 555-000-0002, please resume it."}]
    for n, line in enumerate(lines):
        read = {"name": "get_details_by_id", "arguments": json.dumps({"id": line["line_id"]})}
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"r{n}", "type": "function", "function": read}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": f"r{n}", "content": json.dumps(line)})

    def found(line_id: str) -> list[str]:
        args = json.dumps({"customer_id": "C1", "line_id": line_id})
        call = {"id": "w", "type": "function", "function": {"name": "resume_line", "arguments": args}}
        event = TurnEvent(
            session_id="t", messages=messages, tools=tools, candidate={"role": "assistant", "tool_calls": [call]}
        )
        return [f.detector for f in wrco(event)]

    assert "entity_named_otherwise" not in found("L2")
    assert "entity_named_otherwise" in found("L1")


def test_a_person_a_tool_returned_with_another_birth_date_is_a_contradiction(tau_dir: Path) -> None:
    # ReAct 0#0: the user gives "Mia Li, born 1990-05-15"; her profile, read later, says 1990-04-05; the booking
    # goes out with the date the records contradict (the run fails on it).
    event = turn(tau_dir, REACT, "0#0", 28)
    found = [f for f in wrco(event) if f.detector == "contradicts_tool_output"]
    assert found
    assert "1990-05-15" in found[0].message
    assert "1990-04-05" in found[0].message
    assert "get_user_details" in found[0].message
    same = {**event.candidate, "content": event.candidate["content"].replace("1990-05-15", "1990-04-05")}
    assert "contradicts_tool_output" not in {f.detector for f in wrco(event.model_copy(update={"candidate": same}))}


def test_changing_a_person_of_the_written_record_is_no_contradiction(tau_dir: Path) -> None:
    # The reservation being changed holds the old date of birth: that is what the update replaces.
    tools = load_tools(tau_dir / "domains" / "tau1-airline" / "tools_openai.json")
    reservation = {
        "reservation_id": "ABC123",
        "user_id": "mia_li_3668",
        "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
    }
    read = {"id": "r", "type": "function", "function": {"name": "get_reservation_details", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "My birth date on ABC123 is wrong, it should be 1990-05-15. Yes, change it."},
        {"role": "assistant", "content": None, "tool_calls": [read]},
        {"role": "tool", "tool_call_id": "r", "content": json.dumps(reservation)},
    ]
    passengers = [{"first_name": "Mia", "last_name": "Li", "dob": "1990-05-15"}]
    update = {
        "id": "w",
        "type": "function",
        "function": {
            "name": "update_reservation_passengers",
            "arguments": json.dumps({"reservation_id": "ABC123", "passengers": passengers}),
        },
    }
    event = TurnEvent(
        session_id="t", messages=messages, tools=tools, candidate={"role": "assistant", "tool_calls": [update]}
    )
    assert "contradicts_tool_output" not in {f.detector for f in wrco(event)}
