from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.wire import Category, TurnEvent
from detector_service.engine import Engine
from detector_service.offline.trajectories import load_tools
from tests.tau_turns import QWEN, V1, tools, trajectory, turn

pytestmark = pytest.mark.tau

TRANSFER: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_t",
            "type": "function",
            "function": {"name": "transfer_to_human_agents", "arguments": '{"summary": "user needs help"}'},
        }
    ],
}


def ifu(event: TurnEvent) -> list[str]:
    return [f.detector for f in Engine().evaluate(event).findings if f.category is Category.IFU]


def opening(tau_dir: Path, trajectory_id: str, candidate: dict[str, Any]) -> TurnEvent:
    """The conversation up to the user's first request, answered by ``candidate``."""
    t = trajectory(tau_dir, V1, trajectory_id)
    first_user = next(i for i, m in enumerate(t.messages) if m["role"] == "user")
    return TurnEvent(
        session_id=trajectory_id, messages=t.messages[: first_user + 1], tools=tools(tau_dir, V1), candidate=candidate
    )


def test_handoff_before_any_attempt(tau_dir: Path) -> None:
    # The user asks to book a flight; handing off at once, with no look-up, gives up early.
    assert ifu(opening(tau_dir, "0#0", TRANSFER)) == ["handoff_before_attempt"]


def test_handoff_the_user_asked_for_passes(tau_dir: Path) -> None:
    # "Yes, please transfer me to someone who can assist further."
    assert ifu(turn(tau_dir, V1, "18#3", 16)) == []


def test_claim_without_any_write(tau_dir: Path) -> None:
    claim = {"role": "assistant", "content": "Your reservation has been successfully cancelled."}
    assert ifu(opening(tau_dir, "39#1", claim)) == ["claimed_without_action"]


def test_claim_after_the_write_passes(tau_dir: Path) -> None:
    # gpt-4o reports the cancellation after the cancel call returned.
    t = trajectory(tau_dir, V1, "39#1")
    after = next(
        i
        for i, m in enumerate(t.messages)
        if m["role"] == "assistant" and not m.get("tool_calls") and i > 10 and m.get("content")
    )
    assert ifu(turn(tau_dir, V1, "39#1", after)) == []


def test_deferring_the_request_without_looking_it_up(tau_dir: Path) -> None:
    # gpt-4o asks the user to come back with the details instead of looking them up itself.
    assert ifu(turn(tau_dir, V1, "8#0", 6)) == ["deferred_request"]


def test_deferring_after_the_look_ups_passes(tau_dir: Path) -> None:
    # Same kind of sentence, but after the agent had searched with the read tools.
    t = trajectory(tau_dir, V1, "15#3")
    assert sum(1 for m in t.messages[:26] for c in m.get("tool_calls") or []) > 1
    assert ifu(turn(tau_dir, V1, "15#3", 26)) == []


def telecom(tau_dir: Path, user: str, candidate: str) -> TurnEvent:
    """A tau2 telecom opening (its policy and tools) answered by ``candidate``: a domain where the user works the phone."""
    domain = tau_dir / "domains" / "tau2-telecom"
    return TurnEvent(
        session_id="telecom",
        messages=[
            {"role": "system", "content": (domain / "policy.md").read_text()},
            {"role": "assistant", "content": "Hi! How can I help you today?"},
            {"role": "user", "content": user},
        ],
        tools=load_tools(domain / "tools_openai.json"),
        candidate={"role": "assistant", "content": candidate},
    )


def test_asking_the_user_to_act_and_report_back_is_not_a_deferral(tau_dir: Path) -> None:
    event = telecom(
        tau_dir,
        "My phone shows no service at all.",
        "Let's check a few things on your phone. Please turn off airplane mode. Once you have done that, "
        "let me know whether the signal bars come back.",
    )
    assert ifu(event) == []


def test_sending_the_user_away_for_an_id_in_telecom_is_a_deferral(tau_dir: Path) -> None:
    event = telecom(
        tau_dir,
        "My phone shows no service at all.",
        "To look into this I need your customer ID. Please check your latest bill, and once you have it, "
        "reach out again.",
    )
    assert ifu(event) == ["deferred_request"]


def test_a_state_no_agent_tool_can_change_is_no_claim(tau_dir: Path) -> None:
    # Telecom's agent has no update tool: the APN settings are changed by the user on the phone.
    event = telecom(
        tau_dir,
        "I reset the APN settings like you said.",
        "Thanks! Your APN settings have been updated. Please restart the phone and check mobile data again.",
    )
    assert ifu(event) == []


def test_claiming_what_an_agent_write_tool_does_without_calling_it(tau_dir: Path) -> None:
    # send_payment_request is one of telecom's agent write tools, and it was never called.
    event = telecom(
        tau_dir,
        "I want to pay my overdue bill.",
        "A payment request has been sent to your account. Please accept it to pay the bill.",
    )
    assert ifu(event) == ["claimed_without_action"]


def test_an_empty_reply_is_flagged(tau_dir: Path) -> None:
    # qwen's run on task 11 ends here: no text, no tool call (tau2 records it as agent_error).
    event = turn(tau_dir, QWEN, "11#0", 7)
    assert not event.candidate.get("content")
    assert not event.candidate.get("tool_calls")
    assert ifu(event) == ["empty_reply"]


def test_a_reply_with_text_or_a_call_is_not_empty(tau_dir: Path) -> None:
    assert "empty_reply" not in ifu(turn(tau_dir, QWEN, "11#0", 5))
    assert "empty_reply" not in ifu(opening(tau_dir, "0#0", TRANSFER))


def test_waiting_for_what_the_user_sees_on_the_phone_is_not_a_deferral(tau_dir: Path) -> None:
    event = telecom(
        tau_dir,
        "Mobile data stopped working this morning.",
        "Please open your network settings. Take your time, and let me know the details you see there.",
    )
    assert ifu(event) == []


def test_reporting_a_number_back_after_acting_is_not_a_deferral(tau_dir: Path) -> None:
    # "once you have" + an action: the user is asked to act and report, not to go and find an identifier.
    event = telecom(
        tau_dir,
        "My phone shows no service at all.",
        "Please restart your phone. Once you have restarted it, let me know the number of signal bars you see.",
    )
    assert ifu(event) == []


def test_what_follows_once_you_have_decides_the_deferral(tau_dir: Path) -> None:
    event = telecom(
        tau_dir,
        "My phone shows no service at all.",
        "I can't look this up yet. Once you have located your customer ID, please share it and we'll continue.",
    )
    assert ifu(event) == ["deferred_request"]


def test_taking_time_to_find_the_id_is_a_deferral(tau_dir: Path) -> None:
    # gpt-4o: "Of course! Take your time to find the reservation ID. Let me know when you have it, ..."
    event = turn(tau_dir, V1, "15#0", 10)
    assert event.candidate["content"].startswith("Of course! Take your time to find the reservation ID.")
    assert ifu(event) == ["deferred_request"]


def test_asking_for_the_identifier_now_is_not_a_deferral(tau_dir: Path) -> None:
    # Identifying the customer comes first in telecom; asking for the number, unhurried, sends nobody away.
    event = telecom(
        tau_dir,
        "My mobile data stopped working.",
        "I can help with that. Could you please share the phone number of the line? Take your time.",
    )
    assert ifu(event) == []


def test_a_claim_is_not_checked_where_the_agent_writes_its_calls_as_text(tau_dir: Path) -> None:
    # The same opening claim, in a conversation where the agent wrote a ReAct-style call as text: the write
    # may have happened where the detectors cannot see it, so the claim is no evidence of an unfulfilled request.
    t = trajectory(tau_dir, V1, "39#1")
    first_user = next(i for i, m in enumerate(t.messages) if m["role"] == "user")
    react = {
        "role": "assistant",
        "content": 'Thought: cancel it.\nAction: cancel_reservation\nAction Input: {"reservation_id": "H8Q05L"}',
    }
    observation = {"role": "user", "content": "Observation: the reservation is cancelled."}
    claim = {"role": "assistant", "content": "Your reservation has been successfully cancelled."}
    event = TurnEvent(
        session_id="react",
        messages=[*t.messages[: first_user + 1], react, observation],
        tools=tools(tau_dir, V1),
        candidate=claim,
    )
    assert "claimed_without_action" not in ifu(event)
