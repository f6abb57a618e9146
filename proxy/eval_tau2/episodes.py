"""Finished episodes, one JSON line each in ``<out>/episodes.jsonl``: what a re-run with the same ``--out`` skips,
and everything the report is computed from (the tau2 simulation included)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.eval_tau2.accounting import passed

EPISODES_FILE = "episodes.jsonl"


@dataclass(frozen=True, slots=True)
class EpisodeKey:
    arm: str
    task_id: str
    trial: int


def key_of(record: dict[str, Any]) -> EpisodeKey:
    return EpisodeKey(str(record["arm"]), str(record["task_id"]), int(record["trial"]))


def summary(simulation: dict[str, Any]) -> dict[str, Any]:
    """Reward, success, agent turns and agent tokens of one tau2 simulation."""
    reward_info = simulation.get("reward_info") or {}
    reward = float(reward_info.get("reward") or 0.0)
    # The model's answers, not tau2's fixed greeting (which carries no raw answer).
    agent = [
        m for m in simulation.get("messages") or [] if m.get("role") == "assistant" and m.get("raw_data") is not None
    ]
    tokens: Counter[str] = Counter()
    for m in agent:
        for name in ("prompt_tokens", "completion_tokens"):
            value = (m.get("usage") or {}).get(name)
            if isinstance(value, int):
                tokens[name] += value
    return {
        "reward": reward,
        "success": passed(reward),
        "termination": simulation.get("termination_reason"),
        "turns": len(agent),
        "prompt_tokens": tokens["prompt_tokens"],
        "completion_tokens": tokens["completion_tokens"],
    }


class EpisodeStore:
    """Appends each finished episode as it ends (so Ctrl-C loses nothing finished) and reads them back."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / EPISODES_FILE
        self._lock = threading.Lock()
        self.records: dict[EpisodeKey, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_bytes().splitlines():
                if line.strip():
                    record = orjson.loads(line)
                    self.records[key_of(record)] = record

    def done(self, key: EpisodeKey) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.records[key_of(record)] = record
            with self.path.open("ab") as fh:
                fh.write(orjson.dumps(record) + b"\n")

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self.records.values(), key=lambda r: (r["arm"], r["task_id"], r["trial"]))
