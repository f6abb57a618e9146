"""Real turns from the recorded tau-bench trajectories, cut the way the proxy sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detector_service.contract.wire import TurnEvent
from detector_service.offline.trajectories import Trajectory, load, load_tools

V1 = "tau-bench__airline__gpt-4o__tool-calling__main.jsonl"
QWEN = "tau2-bench__airline__qwen2.5-7b__base50__gym.jsonl"
CLAUDE = "tau2-bench__airline__claude-sonnet-4-5__dev30__pr80.jsonl"
GPT4O_2411 = "tau2-bench__airline__gpt-4o-2024-11-20__dev30__pr103.jsonl"
GPT_OSS = "tau2-bench__airline__gpt-oss-120b__dev30__pr133.jsonl"
GROK = "tau-bench__retail__grok-4-fast-non-reasoning__dev73__grok-tau-bench.jsonl"
TELECOM = "tau2-bench__telecom__gpt-4o__dev20__pr17.jsonl"
REACT = "tau-bench__airline__grok-4-fast-non-reasoning__react-dev30__grok-tau-bench.jsonl"  # actions as text
DOMAIN = {
    V1: "tau1-airline",
    QWEN: "tau2-airline",
    CLAUDE: "tau2-airline",
    GPT4O_2411: "tau2-airline",
    GPT_OSS: "tau2-airline",
    GROK: "tau1-retail",
    TELECOM: "tau2-telecom",
    REACT: "tau1-airline",
}


def trajectory(tau_dir: Path, file: str, trajectory_id: str) -> Trajectory:
    for t in load(tau_dir / "trajectories" / file):
        if t.id == trajectory_id:
            return t
    raise KeyError(f"{trajectory_id} not in {file}")


def tools(tau_dir: Path, file: str) -> list[dict[str, Any]]:
    return load_tools(tau_dir / "domains" / DOMAIN[file] / "tools_openai.json")


def turn(
    tau_dir: Path, file: str, trajectory_id: str, index: int, candidate: dict[str, Any] | None = None
) -> TurnEvent:
    """The assistant message at ``index`` as a candidate, with the conversation before it."""
    t = trajectory(tau_dir, file, trajectory_id)
    message = t.messages[index]
    assert message["role"] == "assistant"
    return TurnEvent(
        session_id=f"{file}:{trajectory_id}",
        messages=t.messages[:index],
        tools=tools(tau_dir, file),
        candidate=candidate if candidate is not None else message,
    )
