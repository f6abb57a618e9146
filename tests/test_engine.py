from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from detector_service.contract.profile import DetectorConfig, Profile, ToolKind, load_profile
from detector_service.contract.wire import Action, Category, Finding, TurnEvent
from detector_service.engine import Engine, merge
from detector_service.offline.trajectories import load
from tests.tau_turns import QWEN, tools, turn

pytestmark = pytest.mark.tau
AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"


def test_verdict_action_is_the_strongest_per_category_action(tau_dir: Path) -> None:
    event = turn(tau_dir, QWEN, "15#0", 29)  # unconfirmed write, ungrounded value and repeated errors at once
    profile = Profile(actions={Category.DCV: Action.GUIDE, Category.WRCO: Action.BLOCK, Category.LOOP: Action.RETRY})
    verdict = Engine(profile).evaluate(event)
    assert {Category.DCV, Category.WRCO, Category.LOOP} <= set(verdict.categories)
    assert verdict.action is Action.BLOCK
    assert verdict.turn_id == event.turn_id
    assert verdict.session_id == event.session_id
    # The same findings, each with the action the decision table gives it (ungrounded value on a write: block).
    assert [f.model_copy(update={"action": None}) for f in verdict.findings] == Engine(profile).findings(event)
    by_detector = {f.detector: f.action for f in verdict.findings}
    assert by_detector["ungrounded_value"] is Action.BLOCK
    assert by_detector["write_without_confirmation"] is Action.GUIDE  # capped by the profile's DCV action


def test_disabled_detectors_do_not_run(tau_dir: Path) -> None:
    event = turn(tau_dir, QWEN, "15#0", 29)
    profile = Profile(detectors={"loop": DetectorConfig(enabled=False), "wrco": DetectorConfig(enabled=False)})
    categories = set(Engine(profile).evaluate(event).categories)
    assert Category.LOOP not in categories
    assert Category.WRCO not in categories
    assert Category.DCV in categories


def test_no_findings_means_pass(tau_dir: Path) -> None:
    verdict = Engine().evaluate(turn(tau_dir, QWEN, "15#0", 3))
    assert verdict.findings == []
    assert verdict.action is Action.PASS
    assert verdict.rewritten is None


def test_one_engine_serves_many_threads(tau_dir: Path) -> None:
    engine = Engine(load_profile(AIRLINE))
    schema = tools(tau_dir, QWEN)
    events = [
        TurnEvent(session_id=t.id, messages=t.messages[:i], tools=schema, candidate=m)
        for t in load(tau_dir / "trajectories" / QWEN)
        for i, m in enumerate(t.messages)
        if m["role"] == "assistant"
    ]
    expected = [[f.message for f in engine.evaluate(e).findings] for e in events]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda e: [f.message for f in engine.evaluate(e).findings], events))
    assert got == expected
    assert any(expected)


def test_merging_judge_findings_recomputes_the_action(tau_dir: Path) -> None:
    event = turn(tau_dir, QWEN, "15#0", 3)
    engine = Engine(Profile(actions={Category.CM: Action.GUIDE}))
    verdict = engine.evaluate(event)
    judged = Finding(category=Category.CM, detector="llm_judge", message="Not what the user asked for.")
    merged = merge(engine, verdict, event.candidate, [judged])
    assert merged.action is Action.GUIDE
    assert merged.findings == [judged]
    assert merged.turn_id == verdict.turn_id
    assert merge(engine, verdict, event.candidate, []) is verdict


@pytest.mark.parametrize(
    "candidate",
    [
        {"role": "assistant", "tool_calls": "not a list"},
        {"role": "assistant", "tool_calls": [None, "x", {"function": None}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "parts"}],
            "tool_calls": [{"id": "c", "function": {}}],
        },
    ],
)
def test_odd_client_shapes_do_not_break_the_engine(candidate: dict[str, object]) -> None:
    messages = [
        {"role": "user", "content": None},
        {"role": "assistant", "tool_calls": {"not": "a list"}},
        {"role": "tool", "tool_call_id": None, "content": [{"type": "text", "text": '{"order_id": 7}'}]},
    ]
    verdict = Engine().evaluate(TurnEvent(session_id="s", messages=messages, candidate=candidate))
    assert verdict.action in set(Action)


def test_a_rewrite_action_without_a_repair_becomes_retry() -> None:
    # A write that cannot run (the table allows acting on it), under a profile that says "rewrite" for MTC.
    tools = [{"type": "function", "function": {"name": "update_f", "parameters": {"type": "object"}}}]
    candidate = {
        "role": "assistant",
        "tool_calls": [{"id": "c", "function": {"name": "update_f", "arguments": "{oops"}}],
    }
    verdict = Engine(Profile(actions={Category.MTC: Action.REWRITE})).evaluate(
        TurnEvent(session_id="s", messages=[], tools=tools, candidate=candidate)
    )
    assert [f.detector for f in verdict.findings] == ["arguments_not_json"]
    assert verdict.action is Action.RETRY
    assert verdict.rewritten is None


def test_tool_kinds_are_resolved_once_per_distinct_tools_array() -> None:
    engine = Engine()
    tools = [{"type": "function", "function": {"name": "purge_cache", "parameters": {"type": "object"}}}]
    annotated = [{**tools[0], "annotations": {"destructiveHint": True}}]
    first = engine.kinds(tools)
    again = engine.kinds([{"type": "function", "function": {"name": "purge_cache", "parameters": {"type": "object"}}}])
    assert again is first  # an equal array parsed again from the next turn
    assert first.kind("purge_cache") is ToolKind.GENERIC
    assert engine.kinds(annotated).kind("purge_cache") is ToolKind.WRITE  # different content, resolved anew


def _scratch(profile: Profile, event: TurnEvent) -> list[Finding]:
    return Engine(profile).findings(event)  # a new engine has no cached index: a full build


def test_session_index_extended_turn_by_turn_gives_what_a_full_build_gives(tau_dir: Path) -> None:
    profile = load_profile(AIRLINE)
    engine = Engine(profile)
    schema = tools(tau_dir, QWEN)
    compared = 0
    for t in list(load(tau_dir / "trajectories" / QWEN))[:8]:
        for i, m in enumerate(t.messages):
            if m["role"] != "assistant":
                continue
            event = TurnEvent(session_id=t.id, messages=t.messages[:i], tools=schema, candidate=m)
            expected = _scratch(profile, event)
            assert engine.findings(event) == expected
            assert engine.findings(event.model_copy(update={"attempt": 1})) == expected  # a retry: same prefix
            compared += 1
    assert compared > 50


def test_session_index_is_rebuilt_when_the_conversation_is_not_an_extension(tau_dir: Path) -> None:
    profile = load_profile(AIRLINE)
    engine = Engine(profile)
    event = turn(tau_dir, QWEN, "15#0", 29)
    engine.findings(event)
    # The same session with its tool outputs rewritten (no errors left) and one message more: the cached
    # index (built over the failing outputs) must not be reused.
    edited = [{**m, "content": '{"status": "ok"}'} if m["role"] == "tool" else m for m in event.messages]
    at = next(i for i, m in enumerate(edited) if m["role"] == "tool")
    longer = event.model_copy(update={"messages": [*edited, {"role": "user", "content": "please go on"}]})
    expected = _scratch(profile, longer)
    assert Category.LOOP not in {f.category for f in expected}
    assert engine.findings(longer) == expected
    shorter = event.model_copy(update={"messages": event.messages[:at]})
    assert engine.findings(shorter) == _scratch(profile, shorter)
    other_tools = event.model_copy(update={"tools": event.tools[:1]})
    assert engine.findings(other_tools) == _scratch(profile, other_tools)
