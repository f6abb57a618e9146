"""Telecom is dual-control: the user works the phone with tools of their own. The agent never sees those calls.

Conversations here use tau2 telecom's real policy and agent tools; the recorded corpus has no telecom runs,
so the turns are written the way tau2 records them (user tool calls, tool results with ``requestor: user``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from detector_service.agents.view import ConversationView
from detector_service.contract.profile import Profile
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import Category, TurnEvent
from detector_service.engine import Engine
from detector_service.offline.trajectories import load, load_tools
from detector_service.turn import ConversationIndex, agent_messages

pytestmark = pytest.mark.tau


def call(call_id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def telecom_tools(tau_dir: Path) -> list[dict[str, Any]]:
    return load_tools(tau_dir / "domains" / "tau2-telecom" / "tools_openai.json")


def conversation(tau_dir: Path) -> list[dict[str, Any]]:
    policy = (tau_dir / "domains" / "tau2-telecom" / "policy.md").read_text()
    return [
        {"role": "system", "content": policy},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "My mobile data stopped working. My number is 555-123-2002."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("a1", "get_customer_by_phone", phone_number="555-123-2002")],
        },
        {"role": "tool", "tool_call_id": "a1", "content": '{"customer_id": "C1001", "line_ids": ["L1001"]}'},
        {"role": "assistant", "content": "Please check whether airplane mode is on, and turn it off if it is."},
        {"role": "user", "content": None, "tool_calls": [call("u1", "check_status_bar")]},
        {"role": "tool", "tool_call_id": "u1", "requestor": "user", "content": "Error: status bar unavailable"},
        {"role": "user", "content": None, "tool_calls": [call("u2", "toggle_airplane_mode")]},
        {
            "role": "tool",
            "tool_call_id": "u2",
            "requestor": "user",
            "content": '{"airplane_mode": false, "apn": "APN-7731"}',
        },
        {"role": "user", "content": "Done, airplane mode is off now, but data still doesn't work."},
    ]


def test_the_users_device_calls_are_not_in_the_agents_view(tau_dir: Path) -> None:
    messages = conversation(tau_dir)
    index = ConversationIndex.build(messages, ToolKinds(Profile(), telecom_tools(tau_dir)))
    assert index.user_count == 2
    assert index.latest_user_text.startswith("Done, airplane mode is off")
    # The device's error is not the agent's tool failing, and what only the device showed was never seen.
    assert index.consecutive_errors == 0
    assert index.failed_keys == set()
    assert index.grounded("C1001")
    assert not index.grounded("APN-7731")
    assert [m.get("tool_call_id") for m in agent_messages(messages) if m["role"] == "tool"] == ["a1"]
    assert not any(m["role"] == "user" and m.get("tool_calls") for m in agent_messages(messages))


def test_a_value_only_the_device_showed_is_ungrounded_in_an_agent_write(tau_dir: Path) -> None:
    candidate = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("a2", "suspend_line", customer_id="C1001", line_id="APN-7731", reason="reset")],
    }
    event = TurnEvent(session_id="t", messages=conversation(tau_dir), tools=telecom_tools(tau_dir), candidate=candidate)
    found = {f.detector for f in Engine().evaluate(event).findings if f.category is Category.WRCO}
    assert found == {"ungrounded_value"}


def test_tau2_results_keep_who_asked_for_a_tool_result(tau_dir: Path, tmp_path: Path) -> None:
    tau2_messages = [
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {
            "role": "user",
            "content": None,
            "tool_calls": [{"id": "u1", "name": "toggle_airplane_mode", "arguments": {}}],
        },
        {"role": "tool", "id": "u1", "requestor": "user", "content": "Airplane mode is now OFF."},
        {"role": "user", "content": "I turned airplane mode off."},
    ]
    results = {
        "info": {"environment_info": {"policy": "Telecom policy."}},
        "tasks": [],
        "simulations": [{"id": "s1", "task_id": "t1", "messages": tau2_messages, "reward_info": {"reward": 1.0}}],
    }
    path = tmp_path / "results.json"
    path.write_bytes(orjson.dumps(results))
    (trajectory,) = load(path)
    tool = next(m for m in trajectory.messages if m["role"] == "tool")
    assert tool == {"role": "tool", "tool_call_id": "u1", "content": "Airplane mode is now OFF.", "requestor": "user"}
    assert len(agent_messages(trajectory.messages)) == len(trajectory.messages) - 2


def _refuel(call_id: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [call(call_id, "refuel_data", customer_id="C1001", line_id="L1001", gb_amount=2)],
    }


def _with_failed_refuel(tau_dir: Path) -> list[dict[str, Any]]:
    return [
        *conversation(tau_dir),
        _refuel("a2"),
        {"role": "tool", "tool_call_id": "a2", "content": "Error: line L1001 is suspended"},
        {"role": "assistant", "content": "Your line is suspended. Shall I resume it first?"},
        {"role": "user", "content": "Yes, please resume it."},
    ]


def loop(messages: list[dict[str, Any]], tau_dir: Path) -> list[str]:
    event = TurnEvent(session_id="t", messages=messages, tools=telecom_tools(tau_dir), candidate=_refuel("a9"))
    return [f.detector for f in Engine().evaluate(event).findings if f.category is Category.LOOP]


def test_retrying_a_failed_call_without_any_change_is_a_loop(tau_dir: Path) -> None:
    assert loop(_with_failed_refuel(tau_dir), tau_dir) == ["repeated_errors"]


def test_retrying_a_failed_call_after_a_write_changed_the_state_is_not_a_loop(tau_dir: Path) -> None:
    resumed = [
        *_with_failed_refuel(tau_dir),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("a3", "resume_line", customer_id="C1001", line_id="L1001")],
        },
        {"role": "tool", "tool_call_id": "a3", "content": '{"line_id": "L1001", "status": "active"}'},
    ]
    assert loop(resumed, tau_dir) == []
    # A resume that failed changed nothing: the refuel retry is still blind.
    failed_resume = [*resumed[:-1], {"role": "tool", "tool_call_id": "a3", "content": "Error: contract ended"}]
    assert loop(failed_resume, tau_dir) == ["repeated_errors"]


def test_reading_again_after_a_write_is_not_a_repeated_call(tau_dir: Path) -> None:
    read = {"role": "assistant", "content": None, "tool_calls": [call("r", "get_details_by_id", id="L1001")]}
    result = {"role": "tool", "tool_call_id": "r", "content": '{"line_id": "L1001", "status": "suspended"}'}
    resume = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("w", "resume_line", customer_id="C1001", line_id="L1001")],
    }
    resumed = {"role": "tool", "tool_call_id": "w", "content": '{"line_id": "L1001", "status": "active"}'}
    messages = [*conversation(tau_dir), read, result, read, result]
    tools = telecom_tools(tau_dir)

    def repeated(history: list[dict[str, Any]]) -> bool:
        event = TurnEvent(session_id="t", messages=history, tools=tools, candidate=read)
        return any(f.detector == "repeated_call" for f in Engine().evaluate(event).findings)

    assert repeated(messages)
    assert not repeated([*messages, resume, resumed])


def test_the_injected_context_sees_only_the_agents_side_too(tau_dir: Path) -> None:
    view = ConversationView.build(conversation(tau_dir), telecom_tools(tau_dir), Profile())
    assert [text for _, text in view.user_turns][-1].startswith("Done, airplane mode is off")
    assert len(view.user_turns) == 2
    assert [(c.name, c.output) for c in view.calls] == [
        ("get_customer_by_phone", '{"customer_id": "C1001", "line_ids": ["L1001"]}')
    ]
