from __future__ import annotations

import json
from pathlib import Path

import pytest

from detector_service.contract.profile import (
    ArgumentConstraint,
    EntityCondition,
    FieldCondition,
    Forbidden,
    Profile,
    RequiresPriorRead,
    load_profile,
)
from detector_service.contract.wire import Action, Category, Finding, TurnEvent
from detector_service.engine import Engine
from tests.tau_turns import V1, turn

pytestmark = pytest.mark.tau
AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"


def rules(profile: Profile, event: TurnEvent) -> list[Finding]:
    return [f for f in Engine(profile).evaluate(event).findings if f.detector in RULE_DETECTORS]


RULE_DETECTORS = {
    "requires_confirmation",
    "requires_prior_read",
    "argument_constraint",
    "forbidden",
    "entity_condition",
}


def test_cancellation_the_policy_does_not_allow(tau_dir: Path) -> None:
    # An economy reservation without insurance, booked long ago: the airline policy forbids cancelling it.
    found = rules(load_profile(AIRLINE), turn(tau_dir, V1, "29#1", 22))
    assert [f.detector for f in found] == ["entity_condition"]
    assert "insurance" in found[0].message


def test_cancellation_the_policy_allows(tau_dir: Path) -> None:
    profile = Profile(
        rules=[
            EntityCondition(
                tool="cancel_reservation",
                argument="reservation_id",
                any_of=[FieldCondition(field="cabin", one_of=["economy", "basic_economy", "business"])],
            )
        ]
    )
    assert rules(profile, turn(tau_dir, V1, "29#1", 22)) == []


def test_a_record_without_the_rules_fields_shows_no_violation(tau_dir: Path) -> None:
    # The same forbidden cancellation, but the reservation record the tool returned carries none of the fields
    # the rule reads (another API's shape): nothing can be concluded from it.
    event = turn(tau_dir, V1, "29#1", 22)
    reservation_id = json.loads(event.candidate["tool_calls"][0]["function"]["arguments"])["reservation_id"]
    bare = [
        {**m, "content": json.dumps({"reservation_id": reservation_id, "note": "archived"})}
        if m.get("role") == "tool" and reservation_id in str(m.get("content"))
        else m
        for m in event.messages
    ]
    assert rules(load_profile(AIRLINE), event.model_copy(update={"messages": bare})) == []


def test_requires_prior_read(tau_dir: Path) -> None:
    event = turn(tau_dir, V1, "0#0", 20)
    read_user = RequiresPriorRead(tool="book_reservation", argument="user_id", read_tools=["get_user_details"])
    read_flight = RequiresPriorRead(tool="book_reservation", argument="user_id", read_tools=["get_flight_status"])
    assert rules(Profile(rules=[read_user]), event) == []
    assert [f.detector for f in rules(Profile(rules=[read_flight]), event)] == ["requires_prior_read"]


def test_argument_constraint(tau_dir: Path) -> None:
    event = turn(tau_dir, V1, "0#0", 20)
    bags = json.loads(event.candidate["tool_calls"][0]["function"]["arguments"])["total_baggages"]
    too_few = ArgumentConstraint(tool="book_reservation", argument="total_baggages", maximum=bags - 1)
    enough = ArgumentConstraint(tool="book_reservation", argument="total_baggages", maximum=bags)
    found = rules(Profile(rules=[too_few]), event)
    assert [f.detector for f in found] == ["argument_constraint"]
    assert "total_baggages" in found[0].message
    assert rules(Profile(rules=[enough]), event) == []


def test_forbidden_tool_blocks_when_the_profile_says_so(tau_dir: Path) -> None:
    profile = Profile(
        rules=[Forbidden(tool="book_reservation", message="bookings are disabled")],
        actions={Category.DCV: Action.BLOCK},
    )
    verdict = Engine(profile).evaluate(turn(tau_dir, V1, "0#0", 20))
    assert [f.detector for f in verdict.findings] == ["forbidden"]
    assert verdict.action is Action.BLOCK


def test_airline_profile_loads_and_names_the_write_tools() -> None:
    profile = load_profile(AIRLINE)
    confirmed = {r.tool for r in profile.rules if r.type == "requires_confirmation"}
    assert confirmed == {
        "book_reservation",
        "cancel_reservation",
        "update_reservation_baggages",
        "update_reservation_flights",
        "update_reservation_passengers",
    }


@pytest.mark.parametrize(
    ("name", "domain"), [("airline", "tau2-airline"), ("retail", "tau2-retail"), ("telecom", "tau2-telecom")]
)
def test_domain_profiles_name_only_real_tools(tau_dir: Path, name: str, domain: str) -> None:
    profile = load_profile(AIRLINE.parent / f"{name}.yaml")
    schema = json.loads((tau_dir / "domains" / domain / "tools_openai.json").read_text())
    real = {t["function"]["name"] for t in schema} | {"think"}  # think exists in the v1 tool sets
    assert set(profile.tools) <= real
    assert {getattr(r, "tool", None) for r in profile.rules} - {None} <= real
    kinds = {t["name"]: t["kind"] for t in json.loads((tau_dir / "domains" / domain / "tools.json").read_text())}
    assert all(profile.tools[n].value == k for n, k in kinds.items() if n in profile.tools)
