"""Deterministic detector throughput on the dev corpus, in turns per second, single process.

Usage: python benchmarks/bench_detectors.py [--tau DIR] [--profile PROFILE.yaml] [--rounds N]

Two figures: replay (one growing index per conversation, as ``fama replay`` runs) and per-turn
``Engine.evaluate`` (a fresh index from the whole conversation each turn, as the worker and the
embedded proxy run). The target is at least 1,000 turns/s per core; time is this process's CPU time, so
other load on a shared machine does not skew the figure.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from detector_service.contract.profile import load_profile
from detector_service.contract.wire import TurnEvent
from detector_service.engine import Engine
from detector_service.offline.replay import replay_one
from detector_service.offline.trajectories import Trajectory, load, load_tools
from detector_service.turn import output_digest, text_values

FILES = {
    "tau-bench__airline__gpt-4o__tool-calling__main.jsonl": "tau1-airline",
    "tau2-bench__airline__qwen2.5-7b__base50__gym.jsonl": "tau2-airline",
}


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tau", type=Path, default=here.parent / "shared" / "data" / "tau")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = Engine(load_profile(args.profile))
    corpus: list[tuple[Trajectory, list[dict[str, object]]]] = []
    for name, domain in FILES.items():
        tools = load_tools(args.tau / "domains" / domain / "tools_openai.json")
        corpus.extend((t, tools) for t in load(args.tau / "trajectories" / name))
    events = [
        TurnEvent(session_id=t.id, messages=t.messages[:i], tools=tools, candidate=m)
        for t, tools in corpus
        for i, m in enumerate(t.messages)
        if m.get("role") == "assistant"
    ]
    best_replay = best_evaluate = 0.0
    for _ in range(args.rounds):
        # Each round starts cold: the message caches may only help within a conversation, as in service.
        text_values.cache_clear()
        output_digest.cache_clear()
        start = time.process_time()
        turns = sum(replay_one(engine, t, tools).turns for t, tools in corpus)
        best_replay = max(best_replay, turns / (time.process_time() - start))
        text_values.cache_clear()
        output_digest.cache_clear()
        start = time.process_time()
        for event in events:
            engine.evaluate(event)
        best_evaluate = max(best_evaluate, len(events) / (time.process_time() - start))
    mean_len = sum(len(e.messages) for e in events) / len(events)
    print(f"corpus: {len(corpus)} trajectories, {len(events)} assistant turns, {mean_len:.1f} messages before a turn")
    print(f"replay (incremental index):      {best_replay:,.0f} turns per CPU-second (1 process, pid {os.getpid()})")
    print(f"Engine.evaluate (index per turn): {best_evaluate:,.0f} turns per CPU-second (1 process)")


if __name__ == "__main__":
    main()
