from __future__ import annotations

from typing import Any

from detector_service.contract.profile import Mode, Profile
from detector_service.contract.wire import Action, Category, Finding, Verdict
from proxy.supervision.decisions import FEEDBACK_PREFIX, Degraded, at_stake, decide

TOOLS = [
    {"type": "function", "function": {"name": "cancel_reservation"}},
    {"type": "function", "function": {"name": "get_reservation_details"}},
]
WRITE: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "ZFA04Y"}'},
        }
    ],
}
READ: dict[str, Any] = {
    "role": "assistant",
    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_reservation_details", "arguments": "{}"}}],
}
TEXT: dict[str, Any] = {"role": "assistant", "content": "Anything else?"}
DCV = Finding(category=Category.DCV, detector="confirmation", message="cancel_reservation needs an explicit yes.")
MTC = Finding(category=Category.MTC, detector="schema", message="Arguments are not valid JSON.")


def verdict(action: Action, *findings: Finding, rewritten: dict[str, Any] | None = None) -> Verdict:
    return Verdict(turn_id="t", session_id="s", action=action, findings=list(findings), rewritten=rewritten)


def test_enforce_retry_carries_feedback_until_attempts_run_out() -> None:
    profile = Profile(max_retries=2)
    first = decide(Mode.ENFORCE, profile, verdict(Action.RETRY, DCV), WRITE, TOOLS, attempt=0)
    assert first.action is Action.RETRY
    assert first.labels == ["retry:DCV"]
    assert first.feedback is not None
    assert first.feedback["role"] == "system"
    content = first.feedback["content"]
    assert isinstance(content, str)
    assert content.startswith(FEEDBACK_PREFIX)
    assert "`cancel_reservation` (reservation_id: ZFA04Y)" in content
    assert "[DCV] cancel_reservation needs an explicit yes." in content
    assert "ask them to confirm" in content
    assert decide(Mode.ENFORCE, profile, verdict(Action.RETRY, DCV), WRITE, TOOLS, attempt=1).action is Action.RETRY
    last = decide(Mode.ENFORCE, profile, verdict(Action.RETRY, DCV), WRITE, TOOLS, attempt=2)
    assert last.action is Action.BLOCK
    assert last.exhausted
    assert last.labels == ["block:DCV"]
    assert last.replacement == {
        "role": "assistant",
        "content": "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?",
    }
    assert last.guidance == ("[DCV] cancel_reservation needs an explicit yes.",)


def test_no_retry_once_tool_call_bytes_reached_the_client() -> None:
    d = decide(Mode.ENFORCE, Profile(), verdict(Action.RETRY, DCV), WRITE, TOOLS, attempt=0, tool_bytes_sent=True)
    assert d.action is Action.GUIDE
    assert not d.changes_answer
    assert d.labels == []
    assert d.intended is Action.RETRY
    assert d.guidance


def test_observe_never_changes_the_answer() -> None:
    for action in (Action.RETRY, Action.BLOCK, Action.REWRITE):
        d = decide(Mode.OBSERVE, Profile(), verdict(action, DCV, rewritten=TEXT), WRITE, TOOLS)
        assert d.action is Action.GUIDE
        assert d.intended is action
        assert d.feedback is None
        assert d.replacement is None
        assert not d.changes_answer
        assert d.guidance == ("[DCV] cancel_reservation needs an explicit yes.",)
    assert decide(Mode.OBSERVE, Profile(), verdict(Action.PASS), WRITE, TOOLS).action is Action.PASS


def test_rewrite_uses_the_repaired_message_or_falls_back_to_retry() -> None:
    repaired = {**WRITE, "tool_calls": [{**WRITE["tool_calls"][0]}]}
    d = decide(Mode.ENFORCE, Profile(), verdict(Action.REWRITE, MTC, rewritten=repaired), WRITE, TOOLS)
    assert d.action is Action.REWRITE
    assert d.replacement == repaired
    assert d.labels == ["rewrite:MTC"]
    fallback = decide(Mode.ENFORCE, Profile(), verdict(Action.REWRITE, MTC), WRITE, TOOLS)
    assert fallback.action is Action.RETRY


def test_guide_and_pass_leave_the_answer() -> None:
    guide = decide(Mode.ENFORCE, Profile(), verdict(Action.GUIDE, DCV), WRITE, TOOLS)
    assert guide.action is Action.GUIDE
    assert guide.guidance
    assert not guide.changes_answer
    passed = decide(Mode.ENFORCE, Profile(), verdict(Action.PASS), WRITE, TOOLS)
    assert passed.action is Action.PASS
    assert not passed.guidance
    assert passed.degraded is None


def test_block_names_the_action_in_plain_words_and_keeps_the_reason_for_the_record() -> None:
    d = decide(Mode.ENFORCE, Profile(), verdict(Action.BLOCK, MTC), WRITE, TOOLS)
    assert d.action is Action.BLOCK
    assert not d.exhausted
    assert d.replacement is not None
    text = d.replacement.get("content")
    assert isinstance(text, str)
    assert "cancel reservation ZFA04Y" in text
    assert "cancel_reservation" not in text
    assert "Arguments are not valid JSON." not in text
    assert [f.message for f in d.findings] == ["Arguments are not valid JSON."]  # the record keeps the reason


def test_degraded_is_fail_open_by_default_and_closed_per_category() -> None:
    open_ = decide(Mode.ENFORCE, Profile(), Degraded("deadline"), WRITE, TOOLS)
    assert open_.action is Action.PASS
    assert open_.degraded == "deadline"
    closed_writes = Profile(on_timeout={"default": "open", "DCV": "closed"})
    blocked = decide(Mode.ENFORCE, closed_writes, Degraded("outage"), WRITE, TOOLS)
    assert blocked.action is Action.BLOCK
    assert blocked.degraded == "outage"
    assert blocked.labels == ["block:DCV"]
    assert blocked.replacement is not None
    assert str(blocked.replacement.get("content")).startswith("I can't cancel reservation ZFA04Y right now.")
    # A read call or a text answer puts no DCV at stake, so the same profile lets them through.
    assert decide(Mode.ENFORCE, closed_writes, Degraded("outage"), READ, TOOLS).action is Action.PASS
    assert decide(Mode.ENFORCE, closed_writes, Degraded("outage"), TEXT, TOOLS).action is Action.PASS
    # Observe mode never blocks, even fail-closed.
    assert decide(Mode.OBSERVE, closed_writes, Degraded("outage"), WRITE, TOOLS).action is Action.PASS


def test_categories_at_stake() -> None:
    assert at_stake(WRITE, TOOLS, Profile())[0] is Category.DCV
    assert Category.DCV not in at_stake(READ, TOOLS, Profile())
    assert at_stake(TEXT, TOOLS, Profile()) == [Category.IFU, Category.CM]
