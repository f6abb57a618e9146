from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from detector_service.confirmation import says_yes
from detector_service.contract.profile import DetectorConfig, OneToolCallPerTurn, Profile, load_profile
from detector_service.contract.wire import Action, Category, Finding, TurnEvent
from detector_service.engine import Engine
from tests.tau_turns import QWEN, V1, turn

pytestmark = pytest.mark.tau
AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"


def detectors(findings: list[Finding]) -> set[str]:
    return {f.detector for f in findings}


def test_write_without_yes_is_flagged(tau_dir: Path) -> None:
    # qwen books while the user only sent passenger details and asked for the total first.
    verdict = Engine().evaluate(turn(tau_dir, QWEN, "10#0", 22))
    dcv = [f for f in verdict.findings if f.category is Category.DCV]
    assert [f.detector for f in dcv] == ["write_without_confirmation"]
    assert "book_reservation" in dcv[0].message
    assert "confirm" in dcv[0].message
    assert verdict.action is Action.RETRY


def test_write_after_an_explicit_go_ahead_passes(tau_dir: Path) -> None:
    # qwen stated the total; the user: "$822 is within my budget, so I'm ready to proceed. ... confirm the booking".
    event = turn(tau_dir, QWEN, "10#0", 26)
    assert "ready to proceed" in event.messages[-1]["content"]
    assert not [f for f in Engine().evaluate(event).findings if f.category is Category.DCV]


def test_write_after_listed_details_and_yes_passes(tau_dir: Path) -> None:
    # gpt-4o listed the booking and the user answered "Yes, please proceed with that booking."
    verdict = Engine().evaluate(turn(tau_dir, V1, "0#0", 20))
    assert not [f for f in verdict.findings if f.category is Category.DCV]


def test_one_call_per_turn_follows_the_policy_and_only_guides_on_reads(tau_dir: Path) -> None:
    # qwen looks up three reservations at once; the airline policy says "one tool call at a time".
    event = turn(tau_dir, QWEN, "9#0", 5)
    assert len(event.candidate["tool_calls"]) > 1
    found = [f for f in Engine().evaluate(event).findings if f.detector == "one_tool_call_per_turn"]
    assert found
    assert {f.action for f in found} == {Action.GUIDE}  # a batch of reads never acts
    off = Profile(detectors={"dcv": DetectorConfig(settings={"one_call_per_turn": False})})
    assert "one_tool_call_per_turn" not in detectors(Engine(off).evaluate(event).findings)
    ruled = Engine(Profile(rules=[OneToolCallPerTurn()])).evaluate(event)
    assert "one_tool_call_per_turn" in detectors(ruled.findings)


def test_text_with_tool_call(tau_dir: Path) -> None:
    # gpt-4o talks to the user and calls the transfer tool in the same message.
    event = turn(tau_dir, V1, "37#3", 6)
    assert event.candidate.get("content")
    assert event.candidate.get("tool_calls")
    strict = Engine(Profile(rules=[OneToolCallPerTurn(no_text_with_tool_call=True)])).evaluate(event)
    lenient = Engine(Profile(rules=[OneToolCallPerTurn()])).evaluate(event)
    assert "one_tool_call_per_turn" in detectors(strict.findings)
    assert "one_tool_call_per_turn" not in detectors(lenient.findings)


def test_profile_narrows_confirmation_to_named_tools(tau_dir: Path) -> None:
    # send_certificate is not among the actions the airline policy lists as needing a yes.
    event = turn(tau_dir, V1, "45#0", 12)
    assert "write_without_confirmation" in detectors(Engine().evaluate(event).findings)
    profiled = Engine(load_profile(AIRLINE)).evaluate(event)
    assert not [f for f in profiled.findings if f.category is Category.DCV]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, please proceed with the change.", True),
        ("Oui, please proceed. Merci!", True),
        ("Sure, here are the details: Liam Khan, born 1985.", False),
        ("No, wait, yes I mean the other one", False),
        ("Please let me know the total before finalizing anything.", False),
        ("Confirming to proceed with both actions.", True),
        ("Change of plan. Please go ahead with the cancellation.", True),
        ("Let me know the total extra cost for these changes before confirming.", False),
        ("I'm not ready to proceed yet.", False),
        ("I can't proceed at $1332.", False),
        ("Sure, go for the cheaper one.", False),
        ("Please do.", True),
        ("Please do not do it yet.", False),
        ("I don't approve of that change.", False),
        ("No deal, I have not agreed to any fee.", False),
        ("Approved, go ahead.", True),
        # a question whether it can be done says yes to nothing; a polite request to do it does
        ("Can we proceed without the IDs?", False),
        ("Could you please go ahead and cancel it?", True),
        ("Yes, proceed with those steps. Also, do I have any other upcoming flights?", True),
    ],
)
def test_says_yes(text: str, expected: bool) -> None:
    assert says_yes(text) is expected


def test_generic_confirmation_check_follows_the_policy_in_the_request(tau_dir: Path) -> None:
    # The same unconfirmed booking, under the telecom policy, which asks for no blanket confirmation.
    event = turn(tau_dir, QWEN, "10#0", 22)
    telecom = (tau_dir / "domains" / "tau2-telecom" / "main_policy.md").read_text()
    messages = [{"role": "system", "content": telecom}, *event.messages[1:]]
    assert "write_without_confirmation" in detectors(Engine().evaluate(event).findings)
    relaxed = event.model_copy(update={"messages": messages})
    assert "write_without_confirmation" not in detectors(Engine().evaluate(relaxed).findings)
    forced = Engine(Profile(detectors={"dcv": DetectorConfig(settings={"confirm_all_writes": True})}))
    assert "write_without_confirmation" in detectors(forced.evaluate(relaxed).findings)


def test_a_yes_counts_for_the_record_read_before_it_or_for_the_agents_own_question() -> None:
    # The user says "please proceed" while giving the details the agent asked for; the agent then reads the
    # reservation and cancels it: nobody saw the record before the yes. Read first, or a yes to the agent's own
    # question, and the same cancellation is confirmed.
    def fn(name: str) -> dict[str, Any]:
        params = {"type": "object", "properties": {"reservation_id": {"type": "string"}}}
        return {"type": "function", "function": {"name": name, "parameters": params}}

    def call(call_id: str, name: str) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": '{"reservation_id": "ZFA04Y"}'},
                }
            ],
        }

    record: dict[str, Any] = {
        "role": "tool",
        "tool_call_id": "r",
        "content": '{"reservation_id": "ZFA04Y", "cabin": "basic_economy"}',
    }
    asked_details: dict[str, Any] = {
        "role": "assistant",
        "content": "To cancel reservation ZFA04Y, what is your user id and the reason?",
    }
    asked_yes: dict[str, Any] = {"role": "assistant", "content": "I will cancel reservation ZFA04Y. Shall I go ahead?"}
    yes: dict[str, Any] = {
        "role": "user",
        "content": "mia_li_3668, change of plans. Please proceed with the cancellation.",
    }
    tools = [fn("get_reservation_details"), fn("cancel_reservation")]

    def found(messages: list[dict[str, Any]]) -> set[str]:
        event = TurnEvent(session_id="s", messages=messages, tools=tools, candidate=call("w", "cancel_reservation"))
        return detectors(Engine().evaluate(event).findings)

    start: dict[str, Any] = {"role": "user", "content": "I want to cancel ZFA04Y."}
    assert "write_without_confirmation" in found(
        [start, asked_details, yes, call("r", "get_reservation_details"), record]
    )
    assert "write_without_confirmation" not in found(
        [start, call("r", "get_reservation_details"), record, asked_details, yes]
    )
    assert "write_without_confirmation" not in found(
        [start, asked_yes, yes, call("r", "get_reservation_details"), record]
    )
