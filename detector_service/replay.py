"""``fama replay``: recorded trajectories through the detectors, turn by turn (DESIGN §6).

Each assistant message is checked as a candidate turn with the conversation before it, exactly as the
proxy would see it. One conversation index per trajectory grows as the replay advances, so a
trajectory costs time linear in its length.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from detector_service.engine import Engine
from detector_service.evaluation import score
from detector_service.profile import Profile, ProfileError, load_profile
from detector_service.toolkinds import ToolKinds
from detector_service.trajectories import Trajectory, TrajectoryError, load, load_tools
from detector_service.turn import ConversationIndex, tools_by_name
from detector_service.wire import Finding


@dataclass(slots=True)
class Flag:
    turn: int
    finding: Finding
    action: str

    def record(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "category": self.finding.category.value,
            "detector": self.finding.detector,
            "action": self.action,
            "message": self.finding.message,
        }


@dataclass(slots=True)
class Replayed:
    trajectory: Trajectory
    flags: list[Flag] = field(default_factory=list)
    turns: int = 0

    def record(self) -> dict[str, Any]:
        return {"id": self.trajectory.id, "reward": self.trajectory.reward, "flags": [f.record() for f in self.flags]}


def replay_one(engine: Engine, trajectory: Trajectory, default_tools: list[dict[str, Any]]) -> Replayed:
    tools = trajectory.tools if trajectory.tools is not None else default_tools
    by_name = tools_by_name(tools)
    index = ConversationIndex(kinds=ToolKinds(engine.profile, tools))
    out = Replayed(trajectory)
    for i, message in enumerate(trajectory.messages):
        if message.get("role") == "assistant":
            out.turns += 1
            found = engine.findings_for(engine.view(index, message, by_name))
            for f in found:
                action = "rewrite" if "repaired_arguments" in f.evidence else engine.profile.action_for(f.category)
                out.flags.append(Flag(turn=i, finding=f, action=str(action)))
        index.add(message)
    return out


def replay(engine: Engine, trajectories: Iterable[Trajectory], tools: list[dict[str, Any]]) -> list[Replayed]:
    return [replay_one(engine, t, tools) for t in trajectories]


def summarize(results: Sequence[Replayed]) -> dict[str, Any]:
    def outcome(r: Replayed) -> str:
        if r.trajectory.reward is None:
            return "unknown"
        return "passed" if r.trajectory.reward >= 1.0 else "failed"

    totals: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    categories: dict[str, Counter[str]] = {}
    for r in results:
        o = outcome(r)
        totals[o] += 1
        if r.flags:
            flagged[o] += 1
        for cat in {f.finding.category.value for f in r.flags}:
            categories.setdefault(cat, Counter())[o] += 1
    return {
        "trajectories": len(results),
        "turns": sum(r.turns for r in results),
        "flagged": sum(1 for r in results if r.flags),
        "by_outcome": {o: {"total": totals[o], "flagged": flagged[o]} for o in sorted(totals)},
        "by_category": {c: dict(v) for c, v in sorted(categories.items())},
    }


def _table(summary: dict[str, Any]) -> Table:
    table = Table(title="fama replay")
    table.add_column("outcome")
    table.add_column("trajectories", justify="right")
    table.add_column("flagged", justify="right")
    table.add_column("share", justify="right")
    for outcome, row in summary["by_outcome"].items():
        share = row["flagged"] / row["total"] if row["total"] else 0.0
        table.add_row(outcome, str(row["total"]), str(row["flagged"]), f"{share:.0%}")
    for cat, row in summary["by_category"].items():
        table.add_row(f"  {cat}", "", ", ".join(f"{k} {v}" for k, v in sorted(row.items())), "")
    return table


def replay_command(
    files: Sequence[Path], *, tools: Path | None = None, profile: Path | None = None, json_out: Path | None = None
) -> int:
    console = Console(stderr=True)
    try:
        prof: Profile = load_profile(profile)
        default_tools = load_tools(tools)
        trajectories = [t for path in files for t in load(Path(path))]
    except (ProfileError, TrajectoryError, OSError, orjson.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    engine = Engine(prof)
    results: list[Replayed] = []
    with Progress(
        TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("replay", total=len(trajectories))
        for t in trajectories:
            results.append(replay_one(engine, t, default_tools))
            progress.advance(task)
    summary = summarize(results)
    if any("ground_truth" in r.trajectory.extra for r in results):
        # Records with ground-truth actions (tau-bench runs) also get the detection-quality numbers.
        summary["evaluation"] = score(results, ToolKinds(prof, default_tools)).report()
    Console(file=sys.stdout).print(_table(summary))
    if "evaluation" in summary:
        ev = summary["evaluation"]
        Console(file=sys.stdout).print(
            f"failed flagged {ev['failed_flagged']:.0%}, passed flagged {ev['passed_flagged']:.0%}, "
            f"failed flagged at or before the first deviating write {ev['failed_early']:.0%}"
        )
        if ev["passed_flagged_runs"]:
            Console(file=sys.stdout).print(
                f"passed runs flagged: {ev['passed_flagged_runs']}, of which "
                f"{ev['passed_flagged_on_deviating_writes']} only on writes outside the ground truth that the "
                f"tool rejected, {ev['passed_flagged_no_write_in_truth']} on tasks whose ground truth has no write"
            )
    if json_out is not None:
        doc = {"records": [r.record() for r in results], "summary": summary}
        json_out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0
