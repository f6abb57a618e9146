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
