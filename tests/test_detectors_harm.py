"""Verdicts act only where harm is likely: the decision table, and the detector fixes it relies on, each on
real dev trajectories (skipped with a reason when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from detector_service.contract.profile import Profile, ToolKind, load_profile
from detector_service.contract.toolkinds import ToolKinds, is_handoff
from detector_service.contract.wire import Action, Category, Finding
from detector_service.engine import Engine
from detector_service.offline.replay import replay
from detector_service.offline.trajectories import load
from detector_service.stakes import Stakes, stakes_of
from detector_service.turn import ConversationIndex, parse_json
from tests.tau_turns import CLAUDE, DOMAIN, GPT4O_2411, GPT_OSS, GROK, REACT, TELECOM, V1, tools, trajectory, turn

pytestmark = pytest.mark.tau
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
ACTING = {Action.RETRY, Action.REWRITE, Action.BLOCK}


def _profile(file: str) -> Profile:
    return load_profile(PROFILES / f"{DOMAIN[file].split('-', 1)[1]}.yaml")


@pytest.mark.parametrize("file", [CLAUDE, GPT_OSS, GROK])
def test_reads_and_parallel_batches_of_reads_never_act(tau_dir: Path, file: str) -> None:
    profile = _profile(file)
    kinds = ToolKinds(profile, tools(tau_dir, file))
    results = replay(Engine(profile), load(tau_dir / "trajectories" / file), tools(tau_dir, file))
    batches = 0
    for r in results:
        for flag in r.flags:
            calls = r.trajectory.messages[flag.turn].get("tool_calls") or []
            names = [c["function"]["name"] for c in calls]
            if names and all(kinds.kind(n) is ToolKind.READ for n in names):
                batches += len(names) > 1
                assert flag.action not in {a.value for a in ACTING}, (r.trajectory.id, flag.finding.detector)
    if file == CLAUDE:
        assert batches > 0  # claude's parallel reads are seen (one_tool_call_per_turn) and only guide


def test_one_call_per_turn_on_claudes_parallel_reads_guides(tau_dir: Path) -> None:
    results = replay(Engine(_profile(CLAUDE)), load(tau_dir / "trajectories" / CLAUDE), tools(tau_dir, CLAUDE))
    style = [f for r in results for f in r.flags if f.finding.detector == "one_tool_call_per_turn"]
    assert style
    assert {f.action for f in style} == {"guide"}


def test_a_handoff_after_lookups_in_the_same_batch_is_no_early_handoff(tau_dir: Path) -> None:
    # gpt-oss looks the reservation up and transfers in one batch: basic economy, not cancellable by policy.
    event = turn(tau_dir, GPT_OSS, "36#0", 3)
    assert [c["function"]["name"] for c in event.candidate["tool_calls"]] == [
        "get_reservation_details",
        "transfer_to_human_agents",
    ]
    found = Engine(_profile(GPT_OSS)).evaluate(event).findings
    assert "handoff_before_attempt" not in {f.detector for f in found}


def test_a_handoff_the_policy_allows_is_no_early_handoff(tau_dir: Path) -> None:
    event = turn(tau_dir, GPT_OSS, "36#0", 3)
    handoff = event.candidate["tool_calls"][1]
    alone = {**event.candidate, "tool_calls": [handoff]}  # no look-up at all, but a reason outside the scope
    allowed = Engine(_profile(GPT_OSS)).evaluate(event.model_copy(update={"candidate": alone}))
    assert "handoff_before_attempt" not in {f.detector for f in allowed.findings}
    bare = {
        **handoff,
        "function": {"name": handoff["function"]["name"], "arguments": '{"summary": "User wants help."}'},
    }
    early = Engine(_profile(GPT_OSS)).evaluate(event.model_copy(update={"candidate": {**alone, "tool_calls": [bare]}}))
    assert "handoff_before_attempt" in {f.detector for f in early.findings}


def test_repeated_transfers_are_one_finding_at_most(tau_dir: Path) -> None:
    results = replay(Engine(_profile(GPT_OSS)), load(tau_dir / "trajectories" / GPT_OSS), tools(tau_dir, GPT_OSS))
    repeats_seen = 0
    for r in results:
        handoffs = sum(
            1 for m in r.trajectory.messages for c in m.get("tool_calls") or [] if is_handoff(c["function"]["name"])
        )
        loops = [f for f in r.flags if f.finding.detector == "repeated_call" and is_handoff(f.finding.tool_name or "")]
        assert len(loops) <= 1, r.trajectory.id
        assert all(f.action == "guide" for f in loops)
        repeats_seen += handoffs > 1
    assert repeats_seen > 0  # gpt-oss does transfer repeatedly in this file


@pytest.mark.parametrize(
    ("file", "trajectory_id", "index"),
    [
        (GPT4O_2411, "38#0", 23),  # "No, that's okay. ... Please go ahead and issue it."
        (GROK, "19#0", 24),  # "Okay, that works for me" after the agent stated the exchange
    ],
)
def test_confirmations_in_other_phrasings_are_recognised(
    tau_dir: Path, file: str, trajectory_id: str, index: int
) -> None:
    event = turn(tau_dir, file, trajectory_id, index)
    found = Engine(Profile()).evaluate(event).findings
    assert "write_without_confirmation" not in {f.detector for f in found}


def test_ids_found_only_as_keys_of_tool_output_objects_are_grounded(tau_dir: Path) -> None:
    t = trajectory(tau_dir, GPT_OSS, "1#0")
    profile_message = t.messages[4]
    user = parse_json(profile_message["content"])
    payments = user["payment_methods"]
    assert isinstance(payments, dict)
    assert payments
    for method in payments.values():
        method.pop("id", None)  # the id only as the object's key, as some tools return it
    keyed_only = {**profile_message, "content": orjson.dumps(user).decode()}
    index = ConversationIndex.build([*t.messages[:4], keyed_only], ToolKinds(Profile(), tools(tau_dir, GPT_OSS)))
    for payment_id in payments:
        assert index.grounded(payment_id)
    assert not index.grounded("credit_card_0000000")


def test_the_judge_and_weak_findings_never_block() -> None:
    profile = Profile(actions={Category.DCV: Action.BLOCK, Category.CM: Action.BLOCK})
    engine = Engine(profile)
    candidate = {
        "role": "assistant",
        "tool_calls": [{"id": "c", "function": {"name": "cancel_order", "arguments": "{}"}}],
    }
    judge = Finding(category=Category.CM, detector="llm_judge", message="looks wrong")
    strong = Finding(
        category=Category.DCV, detector="forbidden", message="x", tool_call_id="c", tool_name="cancel_order"
    )
    action, _ = engine.decide(candidate, [judge, strong])
    assert judge.action is Action.RETRY
    assert strong.action is Action.BLOCK
    assert action is Action.BLOCK
    text = {"role": "assistant", "content": "Done."}
    action, _ = engine.decide(text, [Finding(category=Category.CM, detector="llm_judge", message="x")])
    assert action is Action.GUIDE  # plain text never acts


def test_stakes_follow_what_the_pending_action_can_do() -> None:
    kinds = ToolKinds(Profile())
    calls = [{"id": "a", "name": "get_order"}, {"id": "b", "name": "transfer_to_human_agents"}]
    about_read = Finding(category=Category.LOOP, detector="repeated_call", message="x", tool_call_id="a")
    about_turn = Finding(category=Category.DCV, detector="one_tool_call_per_turn", message="x")
    closing = Finding(category=Category.IFU, detector="deferred_request", message="x")
    assert stakes_of(about_read, calls, kinds) is Stakes.READ
    assert stakes_of(about_turn, calls, kinds) is Stakes.END
    assert stakes_of(closing, [], kinds) is Stakes.END
    assert stakes_of(about_turn, [], kinds) is Stakes.TEXT


def test_a_write_batched_with_a_lookup_acts_a_batch_of_confirmed_writes_guides(tau_dir: Path) -> None:
    # gpt-4o (telecom) enables roaming in the same turn as it first looks up the bills: the write cannot have
    # used the look-up's result. No profile: the "one tool call at a time" rule comes from the request's policy.
    mixed = Engine(Profile()).evaluate(
        turn(tau_dir, TELECOM, "[mms_issue]break_app_sms_permission[PERSONA:None]#0", 15)
    )
    batch = [f for f in mixed.findings if f.detector == "write_in_batch"]
    assert [f.tool_name for f in batch] == ["enable_roaming"]
    assert batch[0].action is Action.RETRY
    # claude cancels the two reservations the user just confirmed, in one turn: style, guidance only.
    writes = Engine(_profile(CLAUDE)).evaluate(turn(tau_dir, CLAUDE, "42#0", 19))
    assert {f.detector for f in writes.findings} == {"one_tool_call_per_turn"}
    assert writes.action is Action.GUIDE


def test_write_details_must_be_in_the_listing_the_yes_answers(tau_dir: Path) -> None:
    # gpt-4o books four flights the user was never shown (the listing before the yes gives only the prices):
    # the confirmation does not cover them. It acts: a write with details the user did not see.
    booked = Engine(_profile(V1)).evaluate(turn(tau_dir, V1, "8#1", 30))
    hidden = [f for f in booked.findings if f.detector == "details_not_listed"]
    assert hidden
    assert "HAT134" in hidden[0].message
    assert hidden[0].action is Action.RETRY
    # claude listed the new return flights earlier and then asked only about the payment: still listed.
    listed = Engine(_profile(CLAUDE)).evaluate(turn(tau_dir, CLAUDE, "21#0", 29))
    assert "details_not_listed" not in {f.detector for f in listed.findings}


def test_a_payment_instrument_the_user_holds_two_of_must_be_named(tau_dir: Path) -> None:
    # gpt-4o changes the flights and charges one of the user's two credit cards: the user said "yes, go ahead"
    # to a cost, never to a card, and no card was named. Which card pays is a detail of the action the user did
    # not see (the policy also has the user provide the card for a flight change). It acts, before the write.
    picked = Engine(_profile(GPT4O_2411)).evaluate(turn(tau_dir, GPT4O_2411, "10#0", 20))
    hidden = [f for f in picked.findings if f.detector == "details_not_listed"]
    assert hidden
    assert "credit_card_7434610" in hidden[0].message
    assert hidden[0].action is Action.RETRY
    # A user with two certificates and two Visa cards, told "certificate 7504069: $250" and "your Visa card
    # ending in 7447": both named.
    named = Engine(_profile(V1)).evaluate(turn(tau_dir, V1, "0#0", 20))
    assert "details_not_listed" not in {f.detector for f in named.findings}


def test_a_figure_computed_for_a_write_must_be_told_before_it(tau_dir: Path) -> None:
    # gpt-4o lists the new flights and the business upgrade, gets a yes, then computes the fare difference
    # (calculate -> 368.0) and changes the reservation, saying "$368" only in the message that makes the call: the
    # user (whose budget was $200) said yes without the cost. A detail the user did not see: it acts, before the write.
    charged = Engine(_profile(V1)).evaluate(turn(tau_dir, V1, "23#2", 20))
    hidden = [f for f in charged.findings if f.detector == "details_not_listed"]
    assert hidden
    assert "368.0" in hidden[0].message
    assert hidden[0].evidence["figures"] == ["calculate returned 368.0"]
    assert hidden[0].action is Action.RETRY
    # The same task in a run that went well: the computed -2580.0 was told as "a refund of $2580" before the yes.
    told = Engine(_profile(V1)).evaluate(turn(tau_dir, V1, "7#2", 20))
    assert "details_not_listed" not in {f.detector for f in told.findings}
    assert told.action is Action.PASS


@pytest.mark.parametrize("profiled", [False, True])
def test_a_go_ahead_given_unasked_before_the_record_was_read_is_no_confirmation(tau_dir: Path, profiled: bool) -> None:
    # ReAct 39#0: asked for the user id and the reason, the user adds "Please proceed with the full refund"; the
    # agent then reads the reservation (basic economy, another passenger) and cancels it without a word.
    profile = _profile(REACT) if profiled else Profile()
    event = turn(tau_dir, REACT, "39#0", 8)
    assert "Please proceed" in event.messages[3]["content"]
    verdict = Engine(profile).evaluate(event)
    found = [f for f in verdict.findings if f.detector in ("requires_confirmation", "write_without_confirmation")]
    assert found
    assert "before 'h8q05l' was even looked up" in found[0].message
    assert verdict.action in ACTING


def test_a_yes_to_the_agents_own_question_stands_though_the_record_is_read_after(tau_dir: Path) -> None:
    # gpt-4o-2024-11-20 40#0: "I will update the passenger name ... Can you confirm?" -> "Yes" -> read -> write.
    event = turn(tau_dir, GPT4O_2411, "40#0", 11)
    assert event.messages[9]["tool_calls"][0]["function"]["name"] == "get_reservation_details"
    found = Engine(_profile(GPT4O_2411)).evaluate(event).findings
    assert not {f.detector for f in found} & {"requires_confirmation", "write_without_confirmation"}
