from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.profile import load_profile
from detector_service.contract.wire import Action, Category, TurnEvent
from detector_service.detectors.paired import paired_arrays
from detector_service.engine import Engine
from tests.tau_turns import GROK, V1, tools, turn

PROFILES = Path(__file__).resolve().parents[1] / "profiles"

pytestmark = pytest.mark.tau


def booking(tau_dir: Path, arguments: Any = None, name: str | None = None) -> TurnEvent:
    """gpt-4o's confirmed booking turn, with its tool call altered."""
    event = turn(tau_dir, V1, "0#0", 20)
    candidate = copy.deepcopy(event.candidate)
    fn = candidate["tool_calls"][0]["function"]
    if arguments is not None:
        fn["arguments"] = arguments
    if name is not None:
        fn["name"] = name
    return event.model_copy(update={"candidate": candidate})


def original_args(tau_dir: Path) -> dict[str, Any]:
    args: dict[str, Any] = json.loads(turn(tau_dir, V1, "0#0", 20).candidate["tool_calls"][0]["function"]["arguments"])
    return args


def mtc(event: TurnEvent) -> list[str]:
    return [f.detector for f in Engine().evaluate(event).findings if f.category is Category.MTC]


def test_recorded_call_is_well_formed(tau_dir: Path) -> None:
    assert mtc(booking(tau_dir)) == []


def test_unknown_tool(tau_dir: Path) -> None:
    verdict = Engine().evaluate(booking(tau_dir, name="book_flight"))
    found = [f for f in verdict.findings if f.category is Category.MTC]
    assert [f.detector for f in found] == ["unknown_tool"]
    assert "book_flight" in found[0].message
    assert "book_reservation" in found[0].message
    assert verdict.action is Action.RETRY


def test_arguments_not_json(tau_dir: Path) -> None:
    assert mtc(booking(tau_dir, arguments='{"user_id": "mia_li_3668", "origin": ')) == ["arguments_not_json"]


def test_schema_violation(tau_dir: Path) -> None:
    args = original_args(tau_dir)
    del args["passengers"]
    args["insurance"] = "maybe"
    verdict = Engine().evaluate(booking(tau_dir, arguments=json.dumps(args)))
    found = [f for f in verdict.findings if f.category is Category.MTC]
    assert [f.detector for f in found] == ["schema_violation"]
    assert "passengers" in found[0].message
    assert "maybe" in found[0].message
    assert verdict.rewritten is None


def test_trailing_comma_is_repaired(tau_dir: Path) -> None:
    args = original_args(tau_dir)
    broken = json.dumps(args)[:-1] + ",}"
    verdict = Engine().evaluate(booking(tau_dir, arguments=broken))
    assert [f.detector for f in verdict.findings if f.category is Category.MTC] == ["arguments_repaired"]
    assert verdict.action is Action.REWRITE
    assert verdict.rewritten is not None
    assert json.loads(verdict.rewritten["tool_calls"][0]["function"]["arguments"]) == args


def test_single_quotes_are_repaired(tau_dir: Path) -> None:
    args = original_args(tau_dir)
    verdict = Engine().evaluate(booking(tau_dir, arguments=repr(args)))
    assert verdict.rewritten is not None
    assert json.loads(verdict.rewritten["tool_calls"][0]["function"]["arguments"]) == args


def test_numeric_string_is_coerced(tau_dir: Path) -> None:
    args = original_args(tau_dir)
    args["total_baggages"] = str(args["total_baggages"])
    verdict = Engine().evaluate(booking(tau_dir, arguments=json.dumps(args)))
    assert verdict.rewritten is not None
    fixed = json.loads(verdict.rewritten["tool_calls"][0]["function"]["arguments"])
    assert fixed["total_baggages"] == int(args["total_baggages"])


def test_arguments_sent_as_object(tau_dir: Path) -> None:
    args = original_args(tau_dir)
    verdict = Engine().evaluate(booking(tau_dir, arguments=args))
    assert verdict.action is Action.REWRITE
    assert verdict.rewritten is not None
    assert json.loads(verdict.rewritten["tool_calls"][0]["function"]["arguments"]) == args


def _retail_tool(tau_dir: Path, name: str) -> dict[str, Any]:
    tool: dict[str, Any] = next(t for t in tools(tau_dir, GROK) if t["function"]["name"] == name)
    return tool


def test_the_lists_a_description_pairs_by_position_are_read_from_it(tau_dir: Path) -> None:
    for name in ("modify_pending_order_items", "exchange_delivered_order_items"):
        assert paired_arrays(_retail_tool(tau_dir, name)["function"]["parameters"]) == (("item_ids", "new_item_ids"),)
    # no airline tool declares such a pairing, lists or not (book_reservation has passengers and payment_methods)
    assert not [t for t in tools(tau_dir, V1) if paired_arrays(t["function"]["parameters"])]


def test_a_pairing_is_read_only_where_the_description_names_one_other_list() -> None:
    def schema(description: str) -> dict[str, Any]:
        lists = {"type": "array", "items": {"type": "string"}}
        return {
            "type": "object",
            "properties": {
                "seatNumbers": lists,
                "passengerIds": lists,
                "mealCodes": {**lists, "description": description},
            },
        }

    assert paired_arrays(schema("One meal code per passenger id, at the same index.")) == (
        ("passengerIds", "mealCodes"),
    )
    assert paired_arrays(schema("Meal codes, in any order, for the passenger ids.")) == ()  # no position
    assert paired_arrays(schema("One per passenger id and seat number, in the same order.")) == ()  # two lists named


def test_an_item_modified_into_nothing_is_retried(tau_dir: Path) -> None:
    # grok-4-fast retail 76#0: asked to remove a jacket from a pending order, the agent sends the item with an empty
    # list of new items (the run failed: the ground truth cancels the order). The retry names both lists.
    event = turn(tau_dir, GROK, "76#0", 12)
    verdict = Engine(load_profile(PROFILES / "retail.yaml")).evaluate(event)
    found = [f for f in verdict.findings if f.detector == "unpaired_arguments"]
    assert len(found) == 1
    assert "1 in 'item_ids' and 0 in 'new_item_ids'" in found[0].message
    assert verdict.action is Action.RETRY


def test_lists_of_the_same_length_pass(tau_dir: Path) -> None:
    event = turn(tau_dir, GROK, "76#0", 12)
    candidate = copy.deepcopy(event.candidate)
    fn = candidate["tool_calls"][0]["function"]
    args = json.loads(fn["arguments"])
    args["new_item_ids"] = ["8733974883"]
    fn["arguments"] = json.dumps(args)
    assert "unpaired_arguments" not in mtc(event.model_copy(update={"candidate": candidate}))
