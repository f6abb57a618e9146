"""The proxy's own words to the end user, the join of held text after shown text, and the cut of quoted context."""

from __future__ import annotations

import json
from typing import Any

import pytest

from detector_service.contract.profile import Mode, Profile
from detector_service.contract.wire import Action, Category, Finding, Verdict
from proxy.supervision.decisions import Degraded, decide
from proxy.supervision.injection import CLOSING, OPENING
from proxy.supervision.quotes import Quoted, QuoteFilter, strip_quotes
from proxy.supervision.replies import CORRECTION, action_phrase, unsaid

TOOLS: list[Any] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("cancel_reservation", "update_reservation_flights", "transfer_to_human_agents")
]


def _call(name: str, **args: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CANDIDATES: list[dict[str, Any]] = [
    {"role": "assistant", "content": None, "tool_calls": [_call("cancel_reservation", reservation_id="ABC123")]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            _call("update_reservation_flights", reservation_id="ABC123", cabin="economy", payment_id="gift_card_7"),
            _call("transfer_to_human_agents", summary="wants a refund"),
        ],
    },
    {"role": "assistant", "content": "I cannot help with that."},
]
# Rule wording as the detectors write it: none of it may reach the user.
REASON = (
    "Rule: read an entity before changing it. 'cancel_reservation' writes reservation_id='ABC123', which no read "
    "tool has looked up"
)


def _verdict(category: Category, action: Action) -> Verdict:
    finding = Finding(category=category, detector="some_detector", message=REASON, tool_name="cancel_reservation")
    return Verdict(turn_id="t", session_id="s", tenant="default", action=action, findings=[finding])


def _user_texts() -> list[tuple[str, str]]:
    """(what, text) of every answer the proxy can write in the agent's place, for every category."""
    out = []
    for candidate in CANDIDATES:
        for category in Category:
            for shown in (False, True):
                for action, attempt in ((Action.BLOCK, 0), (Action.RETRY, 2)):  # a block, a spent retry
                    verdict = _verdict(category, action)
                    d = decide(Mode.ENFORCE, Profile(), verdict, candidate, TOOLS, attempt, text_shown=shown)
                    assert d.action is Action.BLOCK
                    assert d.replacement is not None
                    out.append((f"{category.value} {action.value} {shown}", str(d.replacement.get("content"))))
        closed = Profile(on_timeout={"default": "closed"})
        for shown in (False, True):
            d = decide(Mode.ENFORCE, closed, Degraded("outage"), candidate, TOOLS, text_shown=shown)
            assert d.replacement is not None
            out.append((f"degraded {shown}", str(d.replacement.get("content"))))
    return out


@pytest.mark.parametrize(("what", "text"), _user_texts())
def test_no_rule_wording_reason_or_tool_name_reaches_the_user(what: str, text: str) -> None:
    assert text.strip(), what
    names = [t["function"]["name"] for t in TOOLS]
    for word in ("Rule", "rule", "`", "[DCV]", "detector", "some_detector", "read tool", "entity", *names):
        assert word not in text, (what, word, text)
    assert not any(c.value in text.split() for c in Category), (what, text)


def test_the_held_action_is_said_in_plain_words() -> None:
    assert action_phrase(_call("cancel_reservation", reservation_id="ABC123")) == "cancel reservation ABC123"
    assert (
        action_phrase(_call("update_address", user_id="mia_3668", city="Paris")) == "update address for user mia_3668"
    )
    assert action_phrase(_call("getUserDetails", user_id="u1")) == "get user details u1"
    assert action_phrase(_call("book", flight_number="HAT1", extra=["x"])) == "book for flight HAT1"
    d = decide(Mode.ENFORCE, Profile(), _verdict(Category.DCV, Action.BLOCK), CANDIDATES[0], TOOLS)
    assert d.replacement is not None
    assert (
        d.replacement.get("content") == "Before I cancel reservation ABC123, can you confirm you want me to go ahead?"
    )
    shown = decide(Mode.ENFORCE, Profile(), _verdict(Category.DCV, Action.BLOCK), CANDIDATES[0], TOOLS, text_shown=True)
    assert shown.replacement is not None
    assert str(shown.replacement.get("content")).startswith(CORRECTION + " Before I cancel reservation ABC123")


@pytest.mark.parametrize(
    ("shown", "text", "sent"),
    [
        ("", "Hello.", "Hello."),
        ("Let me look.", "Let me look. It is booked.", " It is booked."),  # the rest of the same answer
        ("Sure, cancelling it now.", "Sure, cancelling it now.", ""),  # a retry that repeats it
        ("Sure, cancelling it now.", "Sure,  cancelling it now.\nDo you confirm?", "\n\nDo you confirm?"),
        ("Sure, cancelling it now.", " Do you confirm?", " Do you confirm?"),  # the model goes on from it
        ("Sure, cancelling it now.", "Do you confirm?", "\n\nDo you confirm?"),  # never glued
        ("One. Two.", "Two.", ""),
    ],
)
def test_held_text_after_shown_text_is_never_told_twice_nor_glued(shown: str, text: str, sent: str) -> None:
    assert unsaid(shown, text) == sent


CONTEXT = "\n".join(
    [
        OPENING,
        "## Verifier: Before the pending write",
        "- Has the user explicitly confirmed this action (yes)?",
        "- [ ] The latest user message explicitly confirms this action.",
        "## Memory: Key facts",
        "- Reservation ZFA04Y, flight HAT136",
        CLOSING,
    ]
)
QUOTING = [
    ("Do you confirm?\n\n## Verifier: Requests\n- Has the user confirmed?\n[/FAMA context]", "Do you confirm?"),
    ("Sure. [FAMA context v1] Notes\n- a\nShall I go ahead?", "Sure."),  # a marker's quote runs to its end
    ("Sure. [FAMA context v1] Notes\nCancel: [x]ZFA04Y\n[/FAMA context]\nShall I?", "Sure. \nShall I?"),
    ("[FAMA context v1]\nCancel: [x]ZFA04Y\n- [f]A: Failed.\n## DCE: Policy rules\n- Before any action", ""),
    ("Sure.\n## [x] The latest user message explicitly confirms this action.\nOk?", "Sure.\nOk?"),
    ("- Reservation ZFA04Y, flight HAT136\nIt is booked.", "It is booked."),
    ("Ok.\n[FAMA feedback] Your previous answer was not sent.\n\n- [DCV] x\nDone.", "Ok."),
    ("Hi\n## Correction from the previous turn\n- [DCV] Rule: confirm.", "Hi"),
    ("Shall I cancel it? ## Verifier: Requests - [ ] confirmed [/FAMA context]", "Shall I cancel it?"),
    ("Shall I? ## Memory: Facts so far\n- reservation_id: ZFA04Y\nThanks.", "Shall I? \nThanks."),
]
CLEAN = [
    "- HAT170 at 10:00, $412\n- HAT045 at 15:00\nWhich one?",
    "## Your options\n[1] economy [2] business",
    "Has the user explicitly asked? No.",
    "  spaced \n\n text \n",
    "Option #2 costs $12 [see fare rules] ## not a heading",
    "- [x] Seat 12A\n- [ ] Seat 12B",
]


@pytest.mark.parametrize(("reply", "kept"), QUOTING)
def test_quoted_context_is_cut_whole_and_streamed_alike(reply: str, kept: str) -> None:
    quoted = Quoted.of([CONTEXT])
    assert strip_quotes(reply, quoted) == (kept, True)
    for size in (1, 2, 3, 7):
        cut = QuoteFilter(quoted)
        streamed = "".join(cut.feed(reply[i : i + size]) for i in range(0, len(reply), size)) + cut.end()
        assert streamed == kept


@pytest.mark.parametrize("reply", CLEAN)
def test_a_reply_without_a_quote_is_untouched_and_streams_alike(reply: str) -> None:
    quoted = Quoted.of([CONTEXT])
    assert strip_quotes(reply, quoted) == (reply, False)
    cut = QuoteFilter(quoted)
    streamed = "".join(cut.feed(reply[i : i + 2]) for i in range(0, len(reply), 2)) + cut.end()
    assert streamed == reply


def test_plain_text_is_not_held_back() -> None:
    cut = QuoteFilter(Quoted.of([CONTEXT]))
    assert cut.feed("Sure") == "Sure"
    assert cut.feed(", one moment") == ", one moment"
    assert cut.feed(".\n") == "."  # a line break waits for the next text: a quote may follow it
    assert cut.feed("Done") == "\nDone"
