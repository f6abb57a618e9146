"""The learned risk monitor: its features, its file, its training and what it makes the proxy do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector_service import stakes
from detector_service.contract.profile import MonitorConfig, Profile, ToolKind, dump_profile, load_profile
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import Action, Category, Finding, TurnEvent
from detector_service.engine import Engine
from detector_service.monitor.features import FEATURE_VERSION, FEATURES, FeatureState, vector
from detector_service.monitor.score import Risk, score
from detector_service.offline.calibrate import calibrate
from detector_service.offline.evaluation import ACTING
from detector_service.offline.protocols import half_of
from detector_service.offline.replay import replay
from detector_service.offline.training import proven, train_monitor
from detector_service.offline.trajectories import Replayed, Trajectory, load
from detector_service.turn import ConversationIndex, TurnView, tools_by_name
from tests.supervised_upstream import ScriptedModel, call, feedback_in
from tests.supervision_harness import CANCEL, LOOKED_UP, QUESTION, TOOLS, proxy_for
from tests.tau_turns import DOMAIN, QWEN, REACT, tools

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
KINDS = ToolKinds(Profile(), TOOLS)
READ = call("get_reservation_details", '{"reservation_id": "ZFA04Y"}', "call_9")
CONFIRMED: list[Any] = [
    *LOOKED_UP,
    {"role": "assistant", "content": QUESTION},
    {"role": "user", "content": "yes"},
]


def _monitor(**update: Any) -> MonitorConfig:
    """A hand-set monitor: the risk rises with a pending write, nothing else counts."""
    n = len(FEATURES)
    weights = [0.0] * n
    weights[FEATURES.index("pending_write")] = 4.0
    base = MonitorConfig(
        enabled=True,
        feature_version=FEATURE_VERSION,
        features=list(FEATURES),
        center=[0.0] * n,
        scale=[1.0] * n,
        coefficients=weights,
        intercept=-2.0,
        threshold=0.5,
        min_turns=0,
    )
    return base.model_copy(update=update)


def _view(messages: list[dict[str, Any]], candidate: dict[str, Any]) -> tuple[TurnView, FeatureState]:
    index = ConversationIndex.build(messages, KINDS)
    return TurnView.of(index, candidate, tools_by_name(TOOLS), Profile()), FeatureState.build(messages, KINDS)


# -- features ---------------------------------------------------------------------------------------------------


@pytest.mark.tau
def test_features_extended_turn_by_turn_equal_features_built_from_scratch(tau_dir: Path) -> None:
    schema = tools(tau_dir, QWEN)
    kinds = ToolKinds(Profile(), schema)
    checked = 0
    for t in list(load(tau_dir / "trajectories" / QWEN))[:10]:
        index, state = ConversationIndex(kinds=kinds), FeatureState(kinds)
        for i, m in enumerate(t.messages):
            if m["role"] == "assistant":
                view = TurnView.of(index, m, tools_by_name(schema), Profile())
                fresh_index = ConversationIndex.build(t.messages[:i], kinds)
                fresh = TurnView.of(fresh_index, m, tools_by_name(schema), Profile())
                got = vector(state, index, view.calls)
                assert got == vector(FeatureState.build(t.messages[:i], kinds), fresh_index, fresh.calls)
                assert len(got) == len(FEATURES)
                checked += 1
            index.add(m)
            state.add(m)
    assert checked > 50


@pytest.mark.tau
def test_the_engine_keeps_a_sessions_features_and_scores_as_a_fresh_build(tau_dir: Path) -> None:
    schema = tools(tau_dir, QWEN)
    profile = Profile(monitor=_monitor())
    engine = Engine(profile)
    t = next(iter(load(tau_dir / "trajectories" / QWEN)))
    for i, m in enumerate(t.messages):
        if m["role"] != "assistant":
            continue
        event = TurnEvent(session_id=t.id, messages=t.messages[:i], tools=schema, candidate=m)
        kept, fresh = engine.evaluate(event), Engine(profile).evaluate(event)
        assert kept.risk is not None
        assert (kept.risk, kept.risk_features, kept.risk_acting) == (fresh.risk, fresh.risk_features, fresh.risk_acting)


def test_features_say_what_the_turn_is() -> None:
    view, state = _view(CONFIRMED, {"role": "assistant", "tool_calls": [CANCEL]})
    x = dict(zip(FEATURES, vector(state, view.index, view.calls), strict=True))
    assert x["user_yes"] == 1.0
    assert x["pending_write"] == 1.0
    assert x["pending_text"] == 0.0
    assert x["tool_error_rate"] == 0.0
    # An id only the assistant ever said, in a write: the user never gave it and no tool returned it.
    told = [
        *LOOKED_UP,
        {"role": "assistant", "content": "Your other booking is QQ77XX."},
        {"role": "user", "content": "yes"},
    ]
    write = {"role": "assistant", "tool_calls": [call("cancel_reservation", '{"reservation_id": "QQ77XX"}')]}
    view, state = _view(told, write)
    x = dict(zip(FEATURES, vector(state, view.index, view.calls), strict=True))
    assert (x["write_value_told_only"], x["write_value_unseen"]) == (1.0, 0.0)


# -- the file ---------------------------------------------------------------------------------------------------


def test_a_monitor_round_trips_through_the_profile_file_as_plain_numbers(tmp_path: Path) -> None:
    profile = Profile(
        monitor=_monitor(
            tools={"cancel_reservation": 40},
            declared={"cancel_reservation": 40, "get_reservation_details": 40},
            fingerprint="f" * 64,
        )
    )
    path = tmp_path / "p.yaml"
    path.write_text(dump_profile(profile))
    text = path.read_text()
    assert "!!python" not in text  # numbers and names only: yaml.safe_load reads it
    assert yaml.safe_load(text)["monitor"]["coefficients"][FEATURES.index("pending_write")] == 4.0
    loaded, written = load_profile(path).monitor, profile.monitor
    assert loaded is not None
    assert written is not None
    assert loaded == written
    view, state = _view(CONFIRMED, {"role": "assistant", "tool_calls": [CANCEL]})
    x = vector(state, view.index, view.calls)
    assert score(loaded, x, ["cancel_reservation"], KINDS.declared) == score(
        written, x, ["cancel_reservation"], KINDS.declared
    )


def test_a_monitor_of_another_feature_version_never_scores() -> None:
    old = _monitor(feature_version="0")
    assert Engine(Profile(monitor=old)).monitor is None
    assert score(old, [1.0] * len(FEATURES), [], ()).abstained is not None


def test_it_abstains_on_a_tool_a_domain_or_a_harness_it_was_not_trained_on() -> None:
    declared = KINDS.declared
    monitor = _monitor(
        min_turns=20, tools={"cancel_reservation": 40}, declared=dict.fromkeys(declared, 40), dialects={"native": 40}
    )
    view, state = _view(CONFIRMED, {"role": "assistant", "tool_calls": [CANCEL]})
    x = vector(state, view.index, view.calls)
    assert score(monitor, x, ["cancel_reservation"], declared).acting
    unknown_tool = score(monitor, x, ["book_reservation"], declared)
    assert not unknown_tool.acting
    assert "book_reservation" in (unknown_tool.abstained or "")
    other_domain = ("get_order_details", "return_delivered_order_items", "cancel_reservation")
    assert not score(monitor, x, ["cancel_reservation"], other_domain).acting
    # A harness writing its actions as text (ReAct) was never in training: its turns are not judged.
    react = score(monitor, x, ["cancel_reservation"], declared, "react")
    assert not react.acting
    assert "react" in (react.abstained or "")


def test_it_abstains_on_a_harness_with_too_few_passed_training_runs() -> None:
    # Forty ReAct turns but nine passed ReAct runs: how often it would flag a good ReAct run was not measurable.
    declared = KINDS.declared
    monitor = _monitor(
        min_turns=20,
        tools={"cancel_reservation": 40},
        declared=dict.fromkeys(declared, 40),
        dialects={"native": 40, "react": 40},
        passed={"native": 25, "react": 9},
        min_passed=20,
    )
    view, state = _view(CONFIRMED, {"role": "assistant", "tool_calls": [CANCEL]})
    x = vector(state, view.index, view.calls)
    assert score(monitor, x, ["cancel_reservation"], declared).acting
    react = score(monitor, x, ["cancel_reservation"], declared, "react")
    assert not react.acting
    assert react.abstained == "react actions had 9 passed training runs"


def test_a_gain_of_a_few_runs_is_not_proof() -> None:
    # 2 more of 35 failed runs for none of 38 passed runs: on the point estimates the monitor would act (5.7% against
    # 0%), but one standard error either way the failed side falls to 2.9%, under twice the 2.6% the passed side
    # may reach.
    assert not proven(2, 35, 0, 38)
    # 5 of 100 failed runs for none of 80 passed ones holds on the pessimistic side of both; with one passed run
    # added, it no longer does.
    assert proven(5, 100, 0, 80)
    assert not proven(5, 100, 1, 80)
    assert not proven(1, 10, 0, 1000)  # below the minimum gain, however clean


# -- the decision -----------------------------------------------------------------------------------------------


def _calls(*names: str) -> list[dict[str, str | None]]:
    return [{"id": f"c{i}", "name": n} for i, n in enumerate(names)]


RISKY = Risk(0.9, 0.5, True, ("pending_write",))


def test_a_risky_write_with_no_finding_gets_a_verification_retry() -> None:
    found: list[Finding] = []
    stakes.apply_risk(found, _calls("cancel_reservation"), KINDS, RISKY)
    [verify] = found
    assert (verify.detector, verify.action, verify.category) == ("monitor_risk", Action.RETRY, Category.DCV)
    assert "make the same call again unchanged" in verify.message
    assert verify.evidence["features"] == ["pending_write"]


def test_a_risky_write_makes_its_guide_findings_act_and_adds_nothing() -> None:
    guide = Finding(category=Category.LOOP, detector="repeated_call", message="m", tool_name="cancel_reservation")
    guide.action = Action.GUIDE
    found = [guide]
    stakes.apply_risk(found, _calls("cancel_reservation"), KINDS, RISKY)
    assert found == [guide]
    assert guide.action is Action.RETRY
    assert guide.evidence["risk"] == 0.9


@pytest.mark.parametrize(
    ("calls", "risk", "attempt"),
    [
        (_calls("get_reservation_details"), RISKY, 0),  # a read
        (_calls(), RISKY, 0),  # plain text
        (_calls("cancel_reservation"), RISKY, 1),  # a retry: the same call sent again passes
        (_calls("cancel_reservation"), Risk(0.4, 0.5, False), 0),  # under the threshold
        (_calls("cancel_reservation"), None, 0),  # no monitor
    ],
)
def test_the_monitor_changes_nothing_elsewhere(
    calls: list[dict[str, str | None]], risk: Risk | None, attempt: int
) -> None:
    guide = Finding(category=Category.LOOP, detector="repeated_call", message="m")
    guide.action = Action.GUIDE
    found = [guide]
    stakes.apply_risk(found, calls, KINDS, risk, attempt)
    assert found == [guide]
    assert guide.action is Action.GUIDE


def test_without_retries_the_monitor_does_nothing_rather_than_block() -> None:
    found: list[Finding] = []
    stakes.apply_risk(found, _calls("cancel_reservation"), KINDS, RISKY, attempt=0, retries=0)
    assert found == []
    event = TurnEvent(
        session_id="s", messages=CONFIRMED, tools=TOOLS, candidate={"role": "assistant", "tool_calls": [CANCEL]}
    )
    verdict = Engine(Profile(monitor=_monitor(), max_retries=0)).evaluate(event)
    assert verdict.risk is not None
    assert not verdict.risk_acting
    assert verdict.action is Action.PASS


# -- training ---------------------------------------------------------------------------------------------------


def _run(task: int, failed: bool, error_before_write: bool) -> Trajectory:
    messages: list[dict[str, Any]] = [*CONFIRMED]
    if error_before_write:
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [READ]},
            {"role": "tool", "tool_call_id": "call_9", "content": "Error: service unavailable"},
        ]
    messages += [{"role": "assistant", "content": None, "tool_calls": [CANCEL]}]
    return Trajectory(
        id=f"{task}#0",
        messages=messages,
        reward=0.0 if failed else 1.0,
        tools=TOOLS,
        extra={"task_id": task, "domain": "airline", "agent_model": "m"},
    )


def test_training_keeps_the_monitor_off_when_outcomes_do_not_follow_the_features() -> None:
    # Every run looks the same; half failed: nothing can be caught within the budget without the passed runs.
    runs = [_run(task, failed=task % 2 == 0, error_before_write=False) for task in range(60)]
    monitor = train_monitor(Profile(), runs, TOOLS)
    assert not monitor.enabled
    assert monitor.why is not None
    assert monitor.why.startswith("off:")
    assert monitor.cv is not None
    assert monitor.cv.monitor_failed_flagged == monitor.cv.table_failed_flagged
    assert (
        not Engine(Profile(monitor=monitor))
        .evaluate(
            TurnEvent(
                session_id="s", messages=CONFIRMED, tools=TOOLS, candidate={"role": "assistant", "tool_calls": [CANCEL]}
            )
        )
        .risk_acting
    )


def test_training_refuses_too_few_runs() -> None:
    monitor = train_monitor(Profile(), [_run(t, t % 2 == 0, t % 2 == 0) for t in range(12)], TOOLS)
    assert not monitor.enabled
    assert monitor.coefficients == []
    assert "too few runs" in (monitor.why or "")


@pytest.mark.tau
def test_a_monitor_trained_on_half_the_airline_tasks_keeps_its_budget_on_its_own_runs(tau_dir: Path) -> None:
    # The leave-task-out training that switches the monitor on (airline, tasks of half 1, every airline file). Whatever
    # fit scores them, the monitor written must not flag more of its own passed runs than the budget allows; the ReAct
    # file brings too few passed runs of its harness for that to be measured, so the monitor stays out of those turns.
    training: list[Trajectory] = []
    react: set[int] = set()
    for name in sorted(DOMAIN):
        if DOMAIN[name].endswith("airline"):
            for t in load(tau_dir / "trajectories" / name):
                if half_of(t) == 1:
                    t.tools = tools(tau_dir, name)
                    training.append(t)
                    if name == REACT:
                        react.add(len(training) - 1)
    table = calibrate(load_profile(PROFILES / "airline.yaml"), training, [])
    monitor = train_monitor(table, training, [])
    assert monitor.min_passed == 20
    assert 0 < monitor.passed["react"] < monitor.min_passed <= monitor.passed["native"]
    acting = monitor.model_copy(update={"enabled": True})
    alone = replay(Engine(table), training, [])
    both = replay(Engine(table.model_copy(update={"monitor": acting})), training, [])

    def flagged(r: Replayed) -> bool:
        return any(f.action in ACTING for f in r.flags)

    passed = [i for i, t in enumerate(training) if t.reward == 1.0]
    assert sum(flagged(both[i]) for i in passed) <= int(monitor.budget * len(passed))
    assert all(flagged(both[i]) == flagged(alone[i]) for i in react)
    assert any(flagged(both[i]) and not flagged(alone[i]) for i in range(len(training)) if i not in react)


def test_training_switches_it_on_where_cross_validation_proves_it() -> None:
    # Failed runs hit a tool error before their (confirmed) write; passed runs did not. The table acts on none.
    runs = [_run(task, failed=task % 3 == 0, error_before_write=task % 3 == 0) for task in range(90)]
    monitor = train_monitor(Profile(), runs, TOOLS)
    assert monitor.enabled, monitor.why
    assert monitor.cv is not None
    assert monitor.cv.table_failed_flagged == 0.0
    assert monitor.cv.monitor_failed_flagged >= 0.9
    assert monitor.cv.monitor_passed_flagged <= monitor.budget
    assert monitor.coefficients[FEATURES.index("tool_error_rate")] > 0
    assert len(monitor.fingerprint) == 64
    errored = _run(999, True, True).messages
    event = TurnEvent(session_id="s", messages=errored[:-1], tools=TOOLS, candidate=errored[-1])
    verdict = Engine(Profile(monitor=monitor)).evaluate(event)
    assert verdict.risk_acting
    assert verdict.action is Action.RETRY
    assert "tool_error_rate" in verdict.risk_features


# -- online -----------------------------------------------------------------------------------------------------


def _profile(**update: Any) -> dict[str, Any]:
    return {
        "monitor": _monitor(**update).model_dump(mode="json"),
        "tools": {"cancel_reservation": ToolKind.WRITE.value},
    }


def test_a_risky_confirmed_write_is_verified_once_and_the_same_call_then_passes(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"tool_calls": [CANCEL]})  # the agent stands by its call
    with proxy_for(model, tmp_path, mode="enforce", profile=_profile()) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CONFIRMED, tools=TOOLS)
        completion = raw.parse()
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        [sent] = completion.choices[0].message.tool_calls or []
        assert json.loads(sent.function.arguments) == {"reservation_id": "ZFA04Y"}  # type: ignore[union-attr]
        first, retry = model.bodies()
        assert feedback_in(first) is None
        feedback = feedback_in(retry) or ""
        assert "make the same call again unchanged" in feedback
        assert "pending_write" in feedback
        # The first attempt's risk acted; the re-emission's was measured and did not.
        registry = app.metrics.registry
        assert registry.get_sample_value("fama_turn_risk_count", {"acted": "true"}) == 1
        assert registry.get_sample_value("fama_turn_risk_count", {"acted": "false"}) == 1
        assert registry.get_sample_value("fama_risk_features_total", {"feature": "pending_write"}) == 1


def test_a_risky_read_is_never_acted_on(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"tool_calls": [READ]})
    always = _monitor(intercept=10.0)  # every turn is over the threshold
    profile = {"monitor": always.model_dump(mode="json")}
    with proxy_for(model, tmp_path, mode="enforce", profile=profile) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CONFIRMED, tools=TOOLS)
        assert "x-fama-intervention" not in raw.headers
        assert len(model.bodies()) == 1


def test_zero_config_ships_no_monitor() -> None:
    assert Profile().monitor is None
    assert Engine(Profile()).monitor is None
    shipped = Path(__file__).resolve().parents[1] / "profiles"
    for path in shipped.glob("*.yaml"):
        monitor = load_profile(path).monitor
        assert monitor is None or not monitor.enabled, path
