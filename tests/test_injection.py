from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.profile import AgentName, Profile
from detector_service.contract.wire import Category
from proxy.metrics import ProxyMetrics
from proxy.supervision.decisions import triggered_agents
from proxy.supervision.injection import (
    CLOSING,
    GUIDANCE_TITLE,
    OPENING,
    Injector,
    Section,
    active_agents,
    approx_tokens,
    fit,
    render,
)
from proxy.supervision.sessions import SessionState

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "cancel_order",
            "description": "Cancel a pending order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_order_details",
            "description": "Get the status and details of an order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        },
    },
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a store agent.\n- Before cancelling an order, ask the user to confirm."},
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Please cancel my order #W1234567, I ordered it by mistake."},
]


def test_triggers_follow_findings() -> None:
    assert triggered_agents([Category.WRCO]) == (AgentName.TOR,)
    assert triggered_agents([Category.DCV]) == (AgentName.VERIFIER, AgentName.DCE)
    assert triggered_agents([Category.IFU, Category.MTC]) == (AgentName.PLANNER, AgentName.TSA)
    assert triggered_agents([Category.LOOP]) == (AgentName.MEMORY,)
    state = SessionState(agents=[AgentName.TOR])
    assert active_agents(Profile(agents=[AgentName.MEMORY]), state) == [AgentName.TOR, AgentName.MEMORY]


def test_one_system_message_after_the_leading_system_messages() -> None:
    metrics = ProxyMetrics()
    injector = Injector(Profile(agents=[AgentName.VERIFIER, AgentName.DCE, AgentName.TSA]), metrics)
    state = SessionState(guidance=["[DCV] cancel_order was called without confirmation."])
    result = injector.inject(MESSAGES, TOOLS, state)
    assert len(result.messages) == len(MESSAGES) + 1
    assert result.messages[:2] == MESSAGES[:2]
    assert result.messages[3:] == MESSAGES[2:]
    added = result.messages[2]
    assert added["role"] == "system"
    assert added["content"] == result.text
    text = result.text or ""
    assert text.startswith(OPENING)
    assert text.endswith(CLOSING)
    assert (
        text.index(f"## {GUIDANCE_TITLE}") < text.index("## Verifier:") < text.index("## DCE:") < text.index("## TSA:")
    )
    assert "- [DCV] cancel_order was called without confirmation." in text
    assert "`cancel_order`" in text
    assert "Before cancelling an order, ask the user to confirm." in text
    assert result.labels == ("guidance", "Verifier", "DCE", "TSA")
    for label in result.labels:
        assert metrics.registry.get_sample_value("fama_injections_total", {"agent": label}) == 1
    assert MESSAGES[2]["content"].startswith("Please cancel")  # the request's own list is untouched


def test_no_system_message_puts_the_context_first() -> None:
    result = Injector(Profile(agents=[AgentName.TSA])).inject(MESSAGES[2:], TOOLS, SessionState())
    assert result.messages[0]["role"] == "system"
    assert result.messages[1] == MESSAGES[2]


def test_nothing_to_say_or_no_budget_adds_nothing() -> None:
    quiet = Injector(Profile(agents=[AgentName.TOR])).inject(MESSAGES, TOOLS, SessionState())
    assert quiet.text is None
    assert quiet.messages == MESSAGES
    state = SessionState(guidance=["[MTC] fix the arguments"])
    off = Injector(Profile(injection_token_budget=0)).inject(MESSAGES, TOOLS, state)
    assert off.text is None
    assert off.messages == MESSAGES


def test_budget_trims_lowest_priority_first() -> None:
    sections = [
        Section("guidance", "G", ["keep me " * 5], 100),
        Section("Verifier", "V", [f"verifier line {i} " * 3 for i in range(5)], 60),
        Section("TSA", "T", [f"tsa line {i} " * 3 for i in range(5)], 20),
    ]
    whole = approx_tokens(render(sections))
    assert fit(sections, whole) == sorted(sections, key=lambda s: -s.priority)
    smaller = fit(sections, whole - 20)
    assert [s.label for s in smaller] == ["guidance", "Verifier", "TSA"]
    assert len(smaller[1].lines) == 5
    assert 0 < len(smaller[2].lines) < 5
    tight = fit(sections, approx_tokens(render(sections[:1])) + 5)
    assert [s.label for s in tight] == ["guidance"]
    for budget in range(0, whole + 1, 7):
        kept = fit(sections, budget)
        assert not kept or approx_tokens(render(kept)) <= budget
    assert len(sections[2].lines) == 5  # inputs are not modified


@pytest.mark.tau
def test_budget_holds_on_a_long_recorded_conversation(tau_dir: Path) -> None:
    with (tau_dir / "trajectories" / "tau-bench__airline__gpt-4o__tool-calling__main.jsonl").open() as f:
        record = json.loads(f.readline())
    tools = json.loads((tau_dir / "domains" / "tau1-airline" / "tools_openai.json").read_text())
    everything = Profile(agents=list(AgentName), injection_token_budget=250)
    result = Injector(everything).inject(record["messages"], tools, SessionState(guidance=["[WRCO] recheck the price"]))
    assert result.text is not None
    assert approx_tokens(result.text) <= 250
    assert result.labels[0] == "guidance"
    roomy = Injector(everything.model_copy(update={"injection_token_budget": 5000}))
    assert len(roomy.inject(record["messages"], tools, SessionState()).labels) > len(result.labels) - 1
