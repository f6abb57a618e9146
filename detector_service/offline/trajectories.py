"""Recorded trajectories in the formats ``fama replay`` and ``fama analyze`` read.

- JSONL: one object per line with an OpenAI-format ``messages`` list and optional ``tools``, ``reward``,
  ``id`` (other fields, such as ``ground_truth``, are kept in ``extra``);
- tau-bench v1 historical trajectories: a JSON list of ``{task_id, trial, reward, info, traj}``;
- tau2-bench results: a JSON object with ``simulations`` (tau2 message format, converted here to
  OpenAI format) and ``info.environment_info.policy`` (added as the system message).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detector_service.contract.wire import Finding


class TrajectoryError(ValueError):
    pass


@dataclass(slots=True)
class Trajectory:
    id: str
    messages: list[dict[str, Any]]
    reward: float | None = None
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _reward(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("reward")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, say: the standard library writes those
        return json.dumps(value)


def _recorded_call(call: Any) -> Any:
    """A recorded tool call in the wire shape: ``{"id", "type": "function", "function": {"name", "arguments":
    <JSON text>}}``. Recorders differ: some keep the arguments as an object, some leave out the ``function`` wrapper
    (``{"id", "name", "arguments"}``). That is how the run was stored, not something the model got wrong (its
    harness ran the call), so it is not read as a malformed call."""
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    if not isinstance(fn, dict):
        if not isinstance(call.get("name"), str):
            return call
        fn = {"name": call["name"], "arguments": call.get("arguments", call.get("parameters", {}))}
        call = {"id": call.get("id"), "type": "function", "function": fn}
    arguments = fn.get("arguments")
    if isinstance(arguments, dict | list):
        call = {**call, "function": {**fn, "arguments": _json_text(arguments)}}
    return call


def _is_parts(content: Any) -> bool:
    """OpenAI content parts (``[{"type": "text", "text": ...}]``), as opposed to a JSON value stored as such."""
    return isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)


def wire_shaped(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in the wire shape, however it was stored: tool calls as :func:`_recorded_call` makes them,
    each with an id (``rec-<message>-<k>`` where the recorder kept none), a tool result answering the oldest call
    still unanswered when it names none, a tool result stored as a JSON value (an object, not text) as its JSON
    text, the legacy ``function_call`` and ``function`` result as a tool call and a tool result. Messages already in
    that shape are kept as they are."""
    out: list[dict[str, Any]] = []
    waiting: list[str] = []  # ids of the latest assistant message's calls not answered yet, oldest first
    for i, m in enumerate(messages):
        legacy = m.get("function_call")
        if m.get("role") == "assistant" and not m.get("tool_calls") and isinstance(legacy, dict):
            # The legacy single function call: the same thing as one tool call.
            m = {k: v for k, v in m.items() if k != "function_call"} | {"tool_calls": [{"function": legacy}]}
        elif m.get("role") == "function":  # its result, answering the call before it
            m = {k: v for k, v in m.items() if k != "role"} | {"role": "tool"}
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list) and calls:
            shaped = [_recorded_call(c) for c in calls]
            for k, c in enumerate(shaped):
                if isinstance(c, dict) and not c.get("id"):
                    shaped[k] = {**c, "id": f"rec-{i}-{k}"}
            if any(a is not b for a, b in zip(shaped, calls, strict=True)):
                m = {**m, "tool_calls": shaped}
            waiting = [str(c["id"]) for c in shaped if isinstance(c, dict) and c.get("id")]
        elif m.get("role") == "tool":
            content = m.get("content")
            if content is not None and not isinstance(content, str) and not _is_parts(content):
                m = {**m, "content": _json_text(content)}
            answered = m.get("tool_call_id")
            if not answered and waiting:
                m = {**m, "tool_call_id": waiting[0]}
            if m.get("tool_call_id") in waiting:
                waiting.remove(str(m["tool_call_id"]))
        out.append(m)
    return out


def _objects(messages: list[Any], where: str) -> list[dict[str, Any]]:
    """The messages of one trajectory, each an object, or a TrajectoryError naming the first that is not."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TrajectoryError(f"{where}: message {i} is {type(m).__name__}, expected an object with a 'role'")
    return messages


def _messages(messages: list[Any], where: str) -> list[dict[str, Any]]:
    """The messages of one OpenAI-format trajectory in the wire shape (:func:`wire_shaped`)."""
    return wire_shaped(_objects(messages, where))


def _from_jsonl(path: Path) -> Iterator[Trajectory]:
    with path.open("rb") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise TrajectoryError(f"{path}:{n + 1}: not JSON: {exc}") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
                raise TrajectoryError(f"{path}:{n + 1}: expected an object with a 'messages' list")
            rid = rec.get("id")
            if rid is None and "task_id" in rec:
                rid = f"{rec['task_id']}" + (f"#{rec['trial']}" if "trial" in rec else "")
            tools = rec.get("tools")
            yield Trajectory(
                id=str(rid if rid is not None else f"{path.name}:{n + 1}"),
                messages=_messages(rec["messages"], f"{path}:{n + 1}"),
                reward=_reward(rec.get("reward")),
                tools=tools if isinstance(tools, list) else None,
                extra={k: v for k, v in rec.items() if k not in ("messages", "tools", "reward", "id")},
            )


def _from_v1(path: Path, data: list[Any]) -> Iterator[Trajectory]:
    for n, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("traj"), list):
            raise TrajectoryError(f"{path}: item {n} has no 'traj' list (not a tau-bench v1 trajectory)")
        info = _mapping(rec.get("info"))
        task = _mapping(info.get("task"))
        yield Trajectory(
            id=f"{rec.get('task_id', n)}#{rec.get('trial', 0)}",
            messages=[dict(m) for m in _messages(rec["traj"], f"{path}: item {n}")],
            reward=_reward(rec.get("reward")),
            extra={"ground_truth": task} if task else {},
        )


def _tau2_message(m: dict[str, Any]) -> dict[str, Any]:
    role = m.get("role")
    if role == "tool":
        out: dict[str, Any] = {"role": "tool", "tool_call_id": m.get("id"), "content": m.get("content") or ""}
        if m.get("error"):
            out["error"] = True
        if m.get("requestor") == "user":
            out["requestor"] = "user"  # dual control: the result of the user's own tool call
        return out
    msg: dict[str, Any] = {"role": role, "content": m.get("content")}
    calls = m.get("tool_calls") or []
    if calls:
        msg["tool_calls"] = [
            {
                "id": c.get("id"),
                "type": "function",
                "function": {"name": c.get("name"), "arguments": orjson.dumps(c.get("arguments") or {}).decode()},
            }
            for c in calls
        ]
    return msg


def _from_tau2(path: Path, data: dict[str, Any]) -> Iterator[Trajectory]:
    env = _mapping(_mapping(data.get("info")).get("environment_info"))
    policy = env.get("policy")
    tools = env.get("tool_defs")
    if isinstance(tools, dict):
        tools = [
            t if "function" in t else {"type": "function", "function": t} for t in tools.values() if isinstance(t, dict)
        ]
    tasks = {str(t.get("id")): t for t in data.get("tasks") or [] if isinstance(t, dict)}
    for n, sim in enumerate(data.get("simulations") or []):
        if not isinstance(sim, dict):
            raise TrajectoryError(f"{path}: simulation {n} is not an object")
        raw = sim.get("messages") or []
        if not isinstance(raw, list):
            raise TrajectoryError(f"{path}: simulation {n} has no 'messages' list")
        raw = _objects(raw, f"{path}: simulation {n}")
        messages = wire_shaped([_tau2_message(m) for m in raw if m.get("role") != "system"])
        if isinstance(policy, str) and policy:
            messages.insert(0, {"role": "system", "content": policy})
        task = tasks.get(str(sim.get("task_id")))
        extra: dict[str, Any] = {"task_id": sim.get("task_id")}
        if task and isinstance(task.get("evaluation_criteria"), dict):
            extra["ground_truth"] = task["evaluation_criteria"]
        yield Trajectory(
            id=str(sim.get("id") or f"{sim.get('task_id')}#{sim.get('trial', n)}"),
            messages=messages,
            reward=_reward(sim.get("reward_info")),
            tools=tools if isinstance(tools, list) else None,
            extra=extra,
        )


def load(path: Path) -> Iterator[Trajectory]:
    """The trajectories of one file, in file order, whatever its format."""
    if path.suffix == ".jsonl":
        yield from _from_jsonl(path)
        return
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        # A .json file may still hold JSON lines.
        yield from _from_jsonl(path)
        return
    if isinstance(data, list):
        yield from _from_v1(path, data)
    elif isinstance(data, dict) and "simulations" in data:
        yield from _from_tau2(path, data)
    elif isinstance(data, dict) and isinstance(data.get("messages"), list):
        yield from _from_jsonl(path)
    else:
        raise TrajectoryError(f"{path}: not a tau-bench v1, tau2-bench or JSONL trajectory file")


def load_tools(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    data = orjson.loads(path.read_bytes())
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]
    if not isinstance(data, list):
        raise TrajectoryError(f"{path}: expected an OpenAI tools array")
    # Accept bare function objects too: wrap them the way the OpenAI API expects.
    return [t if "function" in t else {"type": "function", "function": t} for t in data if isinstance(t, dict)]


@dataclass(slots=True)
class Flag:
    turn: int
    finding: Finding
    action: str
    risk: float | None = None  # the learned monitor's risk for the turn (None: no monitor)
    risk_features: tuple[str, ...] = ()  # the features that raised it most

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "turn": self.turn,
            "category": self.finding.category.value,
            "detector": self.finding.detector,
            "action": self.action,
            "message": self.finding.message,
        }
        if self.risk is not None:
            out["risk"] = self.risk
            out["risk_features"] = list(self.risk_features)
        return out


@dataclass(slots=True)
class TurnFeatures:
    """One assistant turn as the monitor sees it, collected by replay for training."""

    turn: int
    x: list[float]
    pending: tuple[str, ...]  # the names of the turn's calls
    declared: tuple[str, ...]  # the tools the request declared
    dialect: str  # how the harness wrote its actions: native or react
    eligible: bool  # a WRITE or END turn: where the monitor may act


@dataclass(slots=True)
class Replayed:
    trajectory: Trajectory
    flags: list[Flag] = field(default_factory=list)
    turns: int = 0
    # The conversation as the detectors read it (text actions as native calls), message for message.
    messages: list[dict[str, Any]] = field(default_factory=list)
    features: list[TurnFeatures] = field(default_factory=list)  # filled only when replay is asked to collect

    def record(self) -> dict[str, Any]:
        return {"id": self.trajectory.id, "reward": self.trajectory.reward, "flags": [f.record() for f in self.flags]}
