"""False alarms across domains: an agent that follows the policy is not flagged.

For every development task of the five domains (airline, retail, telecom; tau-bench v1 and tau2), a
conversation is built from the task's ground-truth actions the way the policy asks for them: the user's
request, a look-up of each entity before it is changed, the action's details listed and a "yes" from the
user before each write, tool outputs that hold the values the actions use, the user's own device actions
in telecom as dual-control calls, and a closing reply. The detectors, without a profile (the way `fama
replay` is measured), must raise nothing on any of them.

Tasks whose ground truth is only a hand-off are left out: the conversation before the hand-off
(identification, troubleshooting) is not in the data, and a hand-off with nothing tried before it is what
the early hand-off check is for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.profile import Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.engine import Engine
from detector_service.offline.replay import replay_one
from detector_service.offline.trajectories import Trajectory, load_tools
from detector_service.turn import is_id_key, leaves

pytestmark = pytest.mark.tau
DOMAINS = ["tau1-airline", "tau2-airline", "tau1-retail", "tau2-retail", "tau2-telecom"]


def _actions(task: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(name, arguments, who calls it) of the ground truth, v1 or tau2."""
    if "actions" in task:
        return [(a["name"], a.get("kwargs") or {}, "assistant") for a in task["actions"]]
    criteria = task.get("evaluation_criteria") or {}
    return [
        (a["name"], a.get("arguments") or {}, a.get("requestor", "assistant")) for a in criteria.get("actions") or []
    ]


def _request(task: dict[str, Any]) -> str:
    if "instruction" in task:
        return str(task["instruction"])
    known = task["user_scenario"]["instructions"]
    return f"{known.get('reason_for_call') or ''} {known.get('known_info') or ''}".strip()


class Conversation:
    def __init__(self, policy: str, request: str) -> None:
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": policy},
            {"role": "assistant", "content": "Hi! How can I help you today?"},
            {"role": "user", "content": request},
        ]
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, name: str, args: dict[str, Any], output: dict[str, Any], role: str = "assistant") -> None:
        call_id = f"call_{len(self.calls) + 1}"
        self.calls.append((name, args))
        fn = {"name": name, "arguments": json.dumps(args)}
        self.messages.append(
            {"role": role, "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": fn}]}
        )
        result: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "content": json.dumps(output)}
        if role == "user":
            result["requestor"] = "user"
        self.messages.append(result)

    def say(self, role: str, text: str) -> None:
        self.messages.append({"role": role, "content": text})


def golden(task: dict[str, Any], tools: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    kinds = ToolKinds(Profile(), tools)
    functions = {t["function"]["name"]: t["function"] for t in tools}
    actions = _actions(task)
    # What the database holds: every look-up returns the values the task's actions use.
    values = [v for _, args, _ in actions for _, v in leaves(args)]
    talk = Conversation(policy, _request(task))
    for name, args, who in actions:
        if who == "user" or name not in functions:  # telecom: the user works the phone
            talk.call(name, args, {"status": "done"}, role="user")
            talk.say("user", f"I did that ({name.replace('_', ' ')}).")
        elif kinds.kind(name) is not ToolKind.WRITE:
            talk.call(name, args, {**args, "values": values})
        else:
            ids = {k: v for k, v in args.items() if is_id_key(k) and isinstance(v, str)}
            reader = next(
                (
                    tool
                    for tool, fn in functions.items()
                    if kinds.kind(tool) is ToolKind.READ
                    and (params := set((fn.get("parameters") or {}).get("properties") or {}))
                    and params <= set(ids)
                ),
                None,
            )
            if reader is not None:
                lookup = {k: ids[k] for k in functions[reader]["parameters"]["properties"]}
                if (reader, lookup) not in talk.calls:
                    talk.call(reader, lookup, {**lookup, "values": values})
            details = "; ".join(f"{k}: {v}" for k, v in leaves(args))
            talk.say(
                "assistant", f"Here is what I will do: {name.replace('_', ' ')} ({details}). Do you confirm (yes/no)?"
            )
            talk.say("user", "Yes, please proceed.")
            talk.call(name, args, {"status": "ok", **args})
    talk.say("assistant", "All done. Is there anything else I can help you with?")
    return talk.messages


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_policy_following_agent_raises_no_flag(tau_dir: Path, domain: str) -> None:
    folder = tau_dir / "domains" / domain
    tools = load_tools(folder / "tools_openai.json")
    policy = (folder / "policy.md").read_text()
    tasks = [t for t in json.loads((folder / "tasks_dev.json").read_text()) if not _handoff_only(t)]
    assert len(tasks) >= 20
    engine = Engine()
    flagged = {}
    turns = 0
    for task in tasks:
        result = replay_one(
            engine, Trajectory(id=str(task.get("id", task.get("task_id"))), messages=golden(task, tools, policy)), tools
        )
        turns += result.turns
        if result.flags:
            flagged[result.trajectory.id] = [f.finding.message for f in result.flags]
    assert flagged == {}
    assert turns > 3 * len(tasks)  # beyond the greeting and the closing reply: the actions were checked


def _handoff_only(task: dict[str, Any]) -> bool:
    return [name for name, _, _ in _actions(task)] == ["transfer_to_human_agents"]


def test_the_golden_path_of_a_write_is_checked_like_any_run(tau_dir: Path) -> None:
    # The same conversation without the user's yes is flagged: the golden paths above are not vacuous.
    folder = tau_dir / "domains" / "tau2-retail"
    tools = load_tools(folder / "tools_openai.json")
    task = next(
        t
        for t in json.loads((folder / "tasks_dev.json").read_text())
        if any(w == "exchange_delivered_order_items" for w, _, _ in _actions(t))
    )
    messages = golden(task, tools, (folder / "policy.md").read_text())
    unconfirmed = [
        {**m, "content": "Hm, let me think."} if m.get("content") == "Yes, please proceed." else m for m in messages
    ]
    result = replay_one(Engine(), Trajectory(id="t", messages=unconfirmed), tools)
    assert {f.finding.detector for f in result.flags} == {"write_without_confirmation"}
