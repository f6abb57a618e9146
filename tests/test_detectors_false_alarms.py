"""False alarms of general kinds, each read from what the user's words commit to and what the agent asked, on
recorded dev trajectories where the corpus has the kind (skipped with a reason when ../shared/data is absent):

- a go-ahead followed by a detail the agent asked for ("yes" -> "which reason?" -> "change of plans" -> write);
- an id the user or a tool gave in part (its number), in the form the tools' ids take;
- a go-ahead phrased as an answer to the agent's offer ("Would you like me to ...?" -> "I'd like 2 GB, please");
- asking for an id the user does not have and no tool can find, which defers nothing the agent could do.

Each comes with the real protection it must leave in place.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.confirmation import accepts
from detector_service.contract.profile import Profile, load_profile
from detector_service.contract.wire import Finding, TurnEvent
from detector_service.engine import Engine
from detector_service.offline.trajectories import load_tools
from tests.supervised_upstream import call as tool_call
from tests.tau_turns import GPT4O_2411, QWEN, TELECOM, V1, turn

pytestmark = pytest.mark.tau
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
UNCONFIRMED = {"write_without_confirmation", "requires_confirmation"}
HARD = "[mobile_data_issue]user_abroad_roaming_disabled_off[PERSONA:Hard]#0"


def detectors(findings: list[Finding]) -> set[str]:
    return {f.detector for f in findings}


def with_messages(event: TurnEvent, edits: dict[int, str], cut: int | None = None) -> TurnEvent:
    """The event with message contents replaced (index -> text) and, with ``cut``, the candidate's calls cut."""
    messages = copy.deepcopy(event.messages)
    for at, text in edits.items():
        messages[at]["content"] = text
    candidate = copy.deepcopy(event.candidate)
    if cut is not None:
        candidate["tool_calls"] = candidate["tool_calls"][:cut]
    return event.model_copy(update={"messages": messages, "candidate": candidate})


# --- a go-ahead, then a detail the agent asked for -------------------------------------------------------------


def test_a_yes_then_the_detail_asked_for_confirms_the_write(tau_dir: Path) -> None:
    # gpt-4o-2024-11-20, 42#0: "Yes, please go ahead and cancel ... FDZ0T5 and SE9KEL" -> "I need to confirm the
    # reason for cancellation. Could you let me know ...?" -> "The reason for cancellation is a change of plans."
    event = turn(tau_dir, GPT4O_2411, "42#0", 21)
    assert event.messages[18]["content"].startswith("Yes, please go ahead and cancel")
    assert "reason for cancellation" in event.messages[19]["content"]
    for engine in (Engine(), Engine(load_profile(PROFILES / "airline.yaml"))):
        assert not detectors(engine.evaluate(event).findings) & UNCONFIRMED


def test_the_earlier_yes_does_not_stand_when_the_answer_holds_back(tau_dir: Path) -> None:
    event = turn(tau_dir, GPT4O_2411, "42#0", 21)
    doubt = with_messages(event, {20: "A change of plans, but what would the refund be first?"})
    assert "write_without_confirmation" in detectors(Engine().evaluate(doubt).findings)


def test_the_earlier_yes_does_not_stand_when_the_agent_asks_for_it_again(tau_dir: Path) -> None:
    event = turn(tau_dir, GPT4O_2411, "42#0", 21)
    again = with_messages(event, {19: "Both are refundable. Do you confirm both cancellations?"})
    assert "write_without_confirmation" in detectors(Engine().evaluate(again).findings)


def test_an_earlier_question_about_proceeding_is_no_yes(tau_dir: Path) -> None:
    # "Can we proceed ...?" asks whether it is possible; it says yes to nothing.
    event = turn(tau_dir, GPT4O_2411, "42#0", 21)
    asked = with_messages(event, {18: "Can we proceed with cancelling the conflicting reservations FDZ0T5 and SE9KEL?"})
    assert "write_without_confirmation" in detectors(Engine().evaluate(asked).findings)


# --- an id given in part -------------------------------------------------------------------------------------


def _retail(tau_dir: Path, user: str, order_id: str) -> TurnEvent:
    tools = load_tools(tau_dir / "domains" / "tau1-retail" / "tools_openai.json")
    args = {"order_id": order_id, "reason": "ordered by mistake"}
    return TurnEvent(
        session_id="retail-in-part",
        messages=[{"role": "user", "content": user}],
        tools=tools,
        candidate={
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("cancel_pending_order", json.dumps(args), "c1")],
        },
    )


def test_an_order_number_the_user_gave_without_its_prefix_is_grounded(tau_dir: Path) -> None:
    # The schema says "The order id, such as '#W0000000'": the user's 3361211 is the order #W3361211.
    event = _retail(tau_dir, "Cancel my pending order 3361211, I ordered it by mistake. Yes, go ahead.", "#W3361211")
    assert "ungrounded_value" not in detectors(Engine().evaluate(event).findings)


@pytest.mark.parametrize("order_id", ["#W0361211", "#W33612110", "#X3361211", "#W1234567"])
def test_a_number_padded_cut_or_prefixed_otherwise_is_not(tau_dir: Path, order_id: str) -> None:
    event = _retail(tau_dir, "Cancel my pending order 361211, I ordered it by mistake. Yes, go ahead.", order_id)
    assert "ungrounded_value" in detectors(Engine().evaluate(event).findings)


def test_a_card_id_built_from_the_last_digits_stays_ungrounded(tau_dir: Path) -> None:
    # gpt-4o, 27#0: "Please use my credit card ending in 7334"; the profile lists it as credit_card_9074831. An id
    # built from the last digits ("credit_card_7334") has the form of no card id the tools returned.
    event = turn(tau_dir, V1, "27#0", 30)
    args = json.loads(event.candidate["tool_calls"][0]["function"]["arguments"])
    assert args["payment_id"] == "credit_card_9074831"
    made_up = copy.deepcopy(event.candidate)
    made_up["tool_calls"][0]["function"]["arguments"] = json.dumps({**args, "payment_id": "credit_card_7334"})
    assert "ungrounded_value" in detectors(Engine().evaluate(event.model_copy(update={"candidate": made_up})).findings)
    assert "ungrounded_value" not in detectors(Engine().evaluate(event).findings)


def test_a_brand_and_last_digits_made_into_an_id_stay_ungrounded(tau_dir: Path) -> None:
    # qwen, 49#0: "I paid with my Visa card ending in 4421" -> payment_id "visa_4421", an id that exists nowhere.
    found = Engine().evaluate(turn(tau_dir, QWEN, "49#0", 20)).findings
    assert any(f.detector == "ungrounded_value" and "visa_4421" in f.message for f in found)


# --- a go-ahead phrased as an answer to the agent's offer -------------------------------------------------------


def _telecom() -> Profile:
    return load_profile(PROFILES / "telecom.yaml")


def test_taking_up_the_agents_offer_confirms_the_write(tau_dir: Path) -> None:
    # telecom, Hard persona: "Would you like to refuel your data ...? The cost is $5 per GB ..." ->
    # "I would like to refuel 2.0 GB of data, please." -> refuel_data.
    event = turn(tau_dir, TELECOM, HARD, 23)
    assert event.messages[22]["content"] == "I would like to refuel 2.0 GB of data, please."
    assert "requires_confirmation" not in detectors(Engine(_telecom()).evaluate(event).findings)


@pytest.mark.parametrize("reply", ["Thanks, that would help.", "Sure.", "Please do.", "Yes please, 2 GB."])
def test_other_ways_of_taking_the_offer_up(tau_dir: Path, reply: str) -> None:
    event = with_messages(turn(tau_dir, TELECOM, HARD, 23), {22: reply})
    assert "requires_confirmation" not in detectors(Engine(_telecom()).evaluate(event).findings)


@pytest.mark.parametrize(
    "reply",
    [
        "How much would 2 GB cost in total?",
        "Not now, thanks.",
        "Thanks, but I'd rather wait until the next cycle.",
        "I'd like to know more about my plan first.",
        "Thanks for the information. My phone shows 4 bars now and data is working fine so I will hold off.",
        "OK, I have restarted the phone and data still does not work at all on my side.",
    ],
)
def test_an_answer_that_holds_back_confirms_nothing(tau_dir: Path, reply: str) -> None:
    event = with_messages(turn(tau_dir, TELECOM, HARD, 23), {22: reply})
    assert "requires_confirmation" in detectors(Engine(_telecom()).evaluate(event).findings)


def test_a_pick_among_options_is_no_go_ahead(tau_dir: Path) -> None:
    offer = "Would you like me to add 1 GB or 2 GB?"
    assert not accepts("2 GB, thanks.", offer)
    assert not accepts("2 GB, thanks.", "Which amount would you like me to add?")
    assert not accepts("I'll go with option 1, please.", "Would you like to proceed with one of these options?")
    assert accepts("Thanks, that would help.", "I can enable roaming on your line. Would you like me to do that?")
    assert accepts("Sure", "Let me know if you'd like me to enable roaming for you.")
    assert accepts("Thanks, that would help!", "Roaming is off on your line. I can enable it for you.")
    assert not accepts("Thanks!", "I can help you with that. Your line is active.")
    assert not accepts("Thanks!", "Your line is active. Is there anything else I can do for you?")
    # a wish of the user's own takes the offer up only when it names what was offered
    assert accepts("I'd like to cancel it, please.", "Shall I cancel reservation ABC123?")
    assert not accepts("I want a full refund to my card.", "Shall I cancel reservation ABC123?")
    assert not accepts("Sure", "I have enabled roaming. Your data should work now.")


# --- an id the user does not have -----------------------------------------------------------------------------


def test_asking_for_a_user_id_no_tool_can_find_is_no_deferral(tau_dir: Path) -> None:
    # gpt-4o, 24#3 (passed): the user has no user id with them; the airline tools look users up by id only, so
    # "Feel free to reach out when you have your user ID" puts off nothing the agent could do.
    event = turn(tau_dir, V1, "24#3", 8)
    assert "don't have my user ID" in event.messages[3]["content"]
    assert "user ID" in event.candidate["content"]
    for engine in (Engine(), Engine(load_profile(PROFILES / "airline.yaml"))):
        assert "deferred_request" not in detectors(engine.evaluate(event).findings)


def test_sending_the_user_for_reservation_ids_the_profile_lists_is_a_deferral(tau_dir: Path) -> None:
    # gpt-4o, 29#0 (passed by luck: no cancellation was due): the user gave their user id, whose details list
    # every reservation; sending them off to find the reservation ids is the deferral to correct.
    event = turn(tau_dir, V1, "29#0", 4)
    assert "amelia_davis_8890" in event.messages[3]["content"]
    assert "deferred_request" in detectors(Engine().evaluate(event).findings)


def test_sending_the_user_for_an_id_the_tools_find_by_email_is_a_deferral(tau_dir: Path) -> None:
    # Retail tools find the user id by e-mail or by name and zip: coming back with it is not the user's job.
    tools: list[dict[str, Any]] = load_tools(tau_dir / "domains" / "tau1-retail" / "tools_openai.json")
    event = TurnEvent(
        session_id="retail-user-id",
        messages=[{"role": "user", "content": "I want to return a lamp, but I don't have my user id."}],
        tools=tools,
        candidate={"role": "assistant", "content": "Once you have your user ID, please reach out and I'll help."},
    )
    assert "deferred_request" in detectors(Engine().evaluate(event).findings)


def test_an_id_of_a_kind_the_tools_never_speak_of_is_taken_as_findable(tau_dir: Path) -> None:
    # Airline tools know users (looked up by id only) but no "confirmation number": that is the reservation id
    # under another name, which the user's details list, so sending the user for it stays a deferral.
    tools: list[dict[str, Any]] = load_tools(tau_dir / "domains" / "tau1-airline" / "tools_openai.json")

    def deferral(text: str) -> bool:
        event = TurnEvent(
            session_id="airline-kinds",
            messages=[{"role": "user", "content": "I need to change my flight; my user id is noah_muller_9847."}],
            tools=tools,
            candidate={"role": "assistant", "content": text},
        )
        return "deferred_request" in detectors(Engine().evaluate(event).findings)

    assert deferral("Once you have your confirmation number, please reach out again.")
    assert deferral("Once you have the reservation number, please reach out again.")
    assert not deferral("Once you have your user ID, please reach out again.")
