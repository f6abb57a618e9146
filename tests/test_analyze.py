from __future__ import annotations

from pathlib import Path

import pytest

from detector_service.contract.profile import (
    AgentName,
    OneToolCallPerTurn,
    RequiresConfirmation,
    ToolKind,
    load_profile,
)
from detector_service.contract.wire import Category
from detector_service.monitor.features import FEATURE_VERSION, FEATURES
from detector_service.offline.analyze import AGENTS_FOR, analyze_command, select_agents
from tests.tau_turns import DOMAIN, QWEN, V1


@pytest.mark.tau
@pytest.mark.parametrize("file", [V1, QWEN])
def test_analyze_writes_a_loadable_profile_with_policy_rules(tau_dir: Path, tmp_path: Path, file: str) -> None:
    out = tmp_path / "profile.yaml"
    tools = tau_dir / "domains" / DOMAIN[file] / "tools_openai.json"
    assert analyze_command([tau_dir / "trajectories" / file], tools=tools, out=out) == 0
    profile = load_profile(out)
    writes = {name for name, kind in profile.tools.items() if kind is ToolKind.WRITE}
    assert {"book_reservation", "cancel_reservation", "update_reservation_flights"} <= writes
    assert profile.tools["get_user_details"] is ToolKind.READ
    # "obtain explicit user confirmation (yes)" and "one tool call at a time" are in the airline policy.
    assert {r.tool for r in profile.rules if isinstance(r, RequiresConfirmation)} == writes
    assert any(isinstance(r, OneToolCallPerTurn) for r in profile.rules)
    # Unconfirmed writes are the most common first failure in both runs: DCE and the Verifier are chosen.
    assert {AgentName.DCE, AgentName.VERIFIER} <= set(profile.agents)


def test_agent_selection_covers_the_main_failures_only() -> None:
    from collections import Counter

    primary = Counter({Category.DCV: 10, Category.WRCO: 6, Category.LOOP: 1})
    chosen = select_agents(primary)
    assert chosen == [AgentName.DCE, AgentName.VERIFIER, AgentName.TOR, AgentName.MEMORY]
    assert select_agents(Counter({Category.MTC: 4})) == AGENTS_FOR[Category.MTC] == []
    assert select_agents(Counter()) == []


def test_analyze_refuses_unreadable_input(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text("not json\n")
    assert analyze_command([bad], tools=None, out=tmp_path / "p.yaml") == 2


def test_calibration_demotes_findings_that_fire_on_passed_runs() -> None:
    from detector_service.contract.wire import Action
    from detector_service.offline.calibrate import Tally, decide

    # A policy rule firing on 3 of 100 passed and 5 of 100 failed runs: no better than chance -> guide.
    rule = decide("DCV/entity_condition/cancel_order", Tally(failed=5, passed=3, strongest=Action.RETRY), 100, 100)
    assert rule is not None
    assert rule.action is Action.GUIDE
    assert (rule.failed, rule.passed) == (5, 3)
    # The same counts the other way round for a detector: it keeps acting, with the counts beside it.
    kept = decide("WRCO/ungrounded_value", Tally(failed=9, passed=1, strongest=Action.BLOCK), 100, 100)
    assert kept is not None
    assert kept.action is Action.BLOCK
    assert kept.why is None
    # A rule needs a wider margin than a detector (3x against 2x).
    rule_margin = decide("DCV/forbidden/x", Tally(failed=5, passed=2, strongest=Action.RETRY), 100, 100)
    detector_margin = decide("IFU/deferred_request", Tally(failed=5, passed=2, strongest=Action.RETRY), 100, 100)
    assert rule_margin is not None
    assert rule_margin.action is Action.GUIDE
    assert detector_margin is not None
    assert detector_margin.action is Action.RETRY
    assert decide("IFU/empty_reply", Tally(failed=1, passed=0), 100, 100) is None  # too few runs: the table decides


@pytest.mark.tau
def test_analyze_calibrates_a_profile_leaving_a_model_out(tau_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibrated.yaml"
    base = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"
    tools = tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json"
    runs = [tau_dir / "trajectories" / QWEN]
    assert analyze_command(runs, tools=tools, out=out, profile=base) == 0
    profile = load_profile(out)
    assert profile.calibration is not None
    assert (profile.calibration.failed, profile.calibration.passed) == (24, 6)
    assert profile.findings["IFU/empty_reply"].failed == 6
    assert profile.findings["IFU/empty_reply"].passed == 0
    assert analyze_command(runs, tools=tools, out=out, profile=base, leave_out=["ollama_chat/qwen2.5:7b"]) == 0
    left = load_profile(out)
    assert left.findings == {}
    assert left.calibration is not None
    assert left.calibration.failed == 0


@pytest.mark.tau
def test_analyze_writes_the_monitor_it_trained_with_its_figures(tau_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "monitored.yaml"
    base = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"
    tools = tau_dir / "domains" / DOMAIN[V1] / "tools_openai.json"
    assert analyze_command([tau_dir / "trajectories" / V1], tools=tools, out=out, profile=base) == 0
    monitor = load_profile(out).monitor
    assert monitor is not None
    assert monitor.feature_version == FEATURE_VERSION
    assert len(monitor.coefficients) == len(monitor.features) == len(FEATURES)
    assert len(monitor.fingerprint) == 64
    assert monitor.cv is not None
    assert (monitor.cv.failed, monitor.cv.passed) == (67, 53)
    assert monitor.cv.groups == 30  # tasks: the runs of one task are never split between training and scoring
    assert monitor.why is not None
    # On or off, cross-validation kept table + monitor within the budget, and on only with more failed runs caught.
    assert monitor.cv.monitor_passed_flagged <= monitor.budget
    if monitor.enabled:
        assert monitor.cv.monitor_failed_flagged > monitor.cv.table_failed_flagged
    # Trained twice on the same runs, it is the same numbers (training is deterministic).
    again = tmp_path / "again.yaml"
    assert analyze_command([tau_dir / "trajectories" / V1], tools=tools, out=again, profile=base) == 0
    assert load_profile(again).monitor == monitor
