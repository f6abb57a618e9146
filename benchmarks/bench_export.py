"""Peak memory of ``fama sessions export`` over many recorded sessions.

Usage: python benchmarks/bench_export.py --redis-url redis://127.0.0.1:6390/0 [--sessions 10000] [--corpus FILE.jsonl]

Fills the (empty, throw-away) Redis database with ``--sessions`` sessions recorded the way the proxy records them
(:class:`proxy.supervision.recorder.RedisRecorder`: each assistant message of a recorded run is a turn with its
verdict, then the run's outcome), cycling through the runs of ``--corpus``; then runs ``fama sessions export`` as a
child process and prints its peak resident memory (``getrusage`` of the child), the wall time and the bytes written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from detector_service.contract.wire import TurnEvent, Verdict
from detector_service.offline.trajectories import Trajectory, load
from proxy.supervision.recorder import Outcome, RedisRecorder

CORPUS = "tau2-bench__airline__qwen2.5-7b__base50__gym.jsonl"


async def fill(redis_url: str, runs: list[Trajectory], sessions: int) -> int:
    """Record ``sessions`` sessions; the number of turns recorded."""
    turns = 0
    async with Redis.from_url(redis_url) as redis:
        recorder = RedisRecorder(redis, queue_size=100_000)
        await recorder.start()
        for n in range(sessions):
            run = runs[n % len(runs)]
            session = f"bench-{n}"
            first = True
            for i, message in enumerate(run.messages):
                if message.get("role") != "assistant":
                    continue
                event = TurnEvent(
                    session_id=session, messages=run.messages[:i], tools=run.tools or [], candidate=message
                )
                recorder.record_turn(event, whole=first)
                first = False
                recorder.record_verdict(Verdict(turn_id=event.turn_id, session_id=session))
                turns += 1
            if run.reward is not None:
                outcome = "success" if run.reward >= 1.0 else "failure"
                recorder.record_outcome(Outcome(tenant="default", session_id=session, outcome=outcome))
            if n % 100 == 0:
                await recorder.flush()
        await recorder.stop()
        if recorder.dropped:
            raise SystemExit(f"{recorder.dropped} records dropped while filling")
    return turns


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument(
        "--corpus", type=Path, default=here.parent / "shared" / "data" / "tau" / "trajectories" / CORPUS
    )
    args = parser.parse_args()
    runs = list(load(args.corpus))
    started = time.monotonic()
    turns = asyncio.run(fill(args.redis_url, runs, args.sessions))
    print(f"recorded {args.sessions} sessions, {turns} turns in {time.monotonic() - started:.1f} s")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "sessions.jsonl"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
        entry = "import sys; from proxy.cli import main; sys.argv[0] = 'fama'; main()"
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", entry, "sessions", "export", "--redis-url", args.redis_url, "--out", str(out)],
            env=env,
            check=True,
        )
        elapsed = time.monotonic() - started
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = out.stat().st_size
    print(f"export: {elapsed:.1f} s, {size / 1e6:.1f} MB written, peak RSS {peak_kb / 1024:.1f} MB")


if __name__ == "__main__":
    main()
