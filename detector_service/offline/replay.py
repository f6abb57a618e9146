"""``fama replay``: recorded trajectories through the detectors, turn by turn (DESIGN §6).

Each assistant message is checked as a candidate turn with the conversation before it, exactly as the
proxy would see it; a harness's text actions (ReAct) are read as native calls first, as the engine does live. One conversation index per trajectory grows as the replay advances, so a
trajectory costs time linear in its length.

With ``judge.enabled`` in the profile, the assistant turns the judge is asked about (``judge.worth_judging``:
not pure look-ups unless ``judge.skip_reads`` is off) also go to the LLM judge (the profile's
``judge.base_url`` / ``judge.model``; key from ``FAMA_JUDGE_API_KEY`` or the variable ``judge.api_key_env``
names), ``judge_concurrency`` calls at a time. Its findings join the deterministic flags; a judge call that
fails or times out is counted in the summary and the turn keeps its deterministic flags.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from detector_service import stakes
from detector_service.contract.profile import Profile, ProfileError, load_profile
from detector_service.contract.textactions import native_turn
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import TurnEvent
from detector_service.engine import Engine
from detector_service.llm.judge import Judge, JudgeError, make_client, worth_judging
from detector_service.monitor.features import FeatureState, dialect_of, vector
from detector_service.offline.evaluation import outcome_tables, score
from detector_service.offline.trajectories import (
    Flag,
    Replayed,
    Trajectory,
    TrajectoryError,
    TurnFeatures,
    load,
    load_tools,
)
from detector_service.turn import ConversationIndex, agent_messages, is_error_output, tools_by_name


def native_messages(
    profile: Profile, messages: list[dict[str, Any]], tools: Collection[str]
) -> tuple[bool, list[dict[str, Any]]]:
    """A recorded conversation as the detectors read it, message for message (the indexes are the recorded ones):
    actions its harness wrote as text become native calls (``profile.dialect``; auto-detected by default). The
    flag says whether they were text actions."""
    dialect, native, _ = native_turn(profile.dialect, messages, None, tools)
    return dialect.text_actions, native


def unprefixed(messages: list[dict[str, Any]], declared: Collection[str]) -> list[dict[str, Any]]:
    """Calls recorded under a namespace (``functions.get_user_details``, ``default_api.get_user_details``, as some
    harnesses and chat formats write them) under the declared name they stand for; other messages as they are."""
    out = messages
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if not calls or not isinstance(calls, list):
            continue
        renamed = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            bare = name.rsplit(".", 1)[-1] if isinstance(name, str) and "." in name else None
            if isinstance(fn, dict) and bare is not None and name not in declared and bare in declared:
                c = {**c, "function": {**fn, "name": bare}}
            renamed.append(c)
        if any(a is not b for a, b in zip(renamed, calls, strict=True)):
            out = list(out) if out is messages else out
            out[i] = {**m, "tool_calls": renamed}
    return out


def ran_undeclared(messages: Sequence[dict[str, Any]], declared: Collection[str]) -> list[dict[str, Any]]:
    """Tools the record itself shows ran (a call answered by a result that is no error) though the tools given do not
    declare them: the run's harness had them (a ``think`` tool, say), so its calls are not unknown tools. A call
    the harness answered with an error stays one. Declared with no schema: nothing to check their arguments by."""
    called: dict[str, str] = {}
    ran: list[str] = []
    for m in messages:
        calls = m.get("tool_calls")
        for c in calls if isinstance(calls, list) else ():
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict) and c.get("id") and isinstance(fn.get("name"), str) and fn["name"] not in declared:
                called[str(c["id"])] = fn["name"]
        answered = m.get("tool_call_id")
        if m.get("role") == "tool" and isinstance(answered, str) and answered in called and not is_error_output(m):
            name = called.pop(answered)
            if name not in ran:
                ran.append(name)
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ran]


def replay_one(
    engine: Engine, trajectory: Trajectory, default_tools: list[dict[str, Any]], collect: bool = False
) -> Replayed:
    """One trajectory, turn by turn; with ``collect`` each assistant turn's monitor features are kept too."""
    tools = trajectory.tools if trajectory.tools is not None else default_tools
    declared = tools_by_name(tools).keys()
    text_actions, messages = native_messages(engine.profile, trajectory.messages, declared)
    messages = unprefixed(messages, declared)
    tools = [*tools, *ran_undeclared(messages, declared)]
    by_name = tools_by_name(tools)
    kinds = ToolKinds(engine.profile, tools)
    index = ConversationIndex(kinds=kinds, text_actions=text_actions)
    state = FeatureState(kinds) if collect or engine.monitor is not None else None
    out = Replayed(trajectory, messages=messages)
    for i, message in enumerate(out.messages):
        if message.get("role") == "assistant":
            out.turns += 1
            view = engine.view(index, message, by_name)
            found = engine.findings_for(view)
            risk = engine.risk(view, state)
            engine.decide(message, found, kinds, risk)  # sets each finding's action from the decision table
            value, top = (None, ()) if risk is None else (risk.value, risk.top)
            for f in found:
                out.flags.append(Flag(turn=i, finding=f, action=str(f.action), risk=value, risk_features=top))
            if collect and state is not None:
                calls = [{"id": c.call_id, "name": c.name} for c in view.calls]
                eligible = stakes.turn_stakes(found, calls, kinds) >= stakes.Stakes.END
                pending = tuple(c.name for c in view.calls)
                out.features.append(
                    TurnFeatures(
                        i, vector(state, index, view.calls), pending, kinds.declared, dialect_of(index), eligible
                    )
                )
        index.add(message)
        if state is not None:
            state.add(message)
    return out


def replay(
    engine: Engine, trajectories: Iterable[Trajectory], tools: list[dict[str, Any]], collect: bool = False
) -> list[Replayed]:
    return [replay_one(engine, t, tools, collect) for t in trajectories]


@dataclass(slots=True)
class JudgeStats:
    calls: int = 0
    findings: int = 0
    errors: int = 0
    first_error: str | None = None


def _judge_turns(
    results: Sequence[Replayed], default_tools: list[dict[str, Any]], profile: Profile
) -> list[tuple[Replayed, int, TurnEvent]]:
    out = []
    for r in results:
        t = r.trajectory
        tools = t.tools if t.tools is not None else default_tools
        messages = native_messages(profile, t.messages, tools_by_name(tools).keys())[1]
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                event = TurnEvent(
                    turn_id=f"replay:{t.id}:{i}",
                    session_id=t.id,
                    messages=agent_messages(messages[:i]),
                    tools=tools,
                    candidate=message,
                )
                if worth_judging(event, profile):
                    out.append((r, i, event))
    return out


async def judge_results(
    judge: Judge,
    profile: Profile,
    results: Sequence[Replayed],
    default_tools: list[dict[str, Any]],
    *,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> JudgeStats:
    """Add the judge's findings to ``results`` as flags, at most ``concurrency`` calls at once."""
    stats = JudgeStats()
    turns = _judge_turns(results, default_tools, profile)
    slots = asyncio.Semaphore(max(1, concurrency))
    task = progress.add_task("judge", total=len(turns)) if progress is not None else None

    engine = Engine(profile)

    async def one(r: Replayed, at: int, event: TurnEvent) -> None:
        async with slots:
            stats.calls += 1
            try:
                found = await judge.findings(event)
            except JudgeError as exc:
                stats.errors += 1
                stats.first_error = stats.first_error or str(exc)
                found = []
        engine.decide(event.candidate, found, engine.kinds(event.tools))
        for f in found:
            # ``at`` indexes the recorded messages; the event's own are fewer under dual control.
            r.flags.append(Flag(turn=at, finding=f, action=str(f.action)))
        stats.findings += len(found)
        if progress is not None and task is not None:
            progress.advance(task)

    await asyncio.gather(*(one(r, i, e) for r, i, e in turns))
    for r in results:
        r.flags.sort(key=lambda f: f.turn)  # stable: the deterministic flags of a turn stay first
    return stats


async def _run_judge(
    profile: Profile,
    results: Sequence[Replayed],
    default_tools: list[dict[str, Any]],
    concurrency: int,
    progress: Progress,
    api_key: str | None,
) -> JudgeStats:
    config = profile.judge
    key = api_key or (os.environ.get(config.api_key_env) if config.api_key_env else None)
    judge = Judge(config, make_client(config, key))
    try:
        return await judge_results(judge, profile, results, default_tools, concurrency=concurrency, progress=progress)
    finally:
        await judge.aclose()


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
    files: Sequence[Path],
    *,
    tools: Path | None = None,
    profile: Path | None = None,
    json_out: Path | None = None,
    judge_concurrency: int = 4,
    judge_api_key: str | None = None,
) -> int:
    """``judge_api_key``: the judge's key (``FAMA_JUDGE_API_KEY``), else the variable the profile's
    ``judge.api_key_env`` names."""
    console = Console(stderr=True)
    try:
        prof: Profile = load_profile(profile)
        default_tools = load_tools(tools)
        sources = [(Path(path).name, t) for path in files for t in load(Path(path))]
        trajectories = [t for _, t in sources]
    except (ProfileError, TrajectoryError, OSError, orjson.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if prof.judge.enabled and not (prof.judge.base_url and prof.judge.model):
        console.print("[red]error:[/red] the profile enables the judge but names no judge.base_url and judge.model")
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
        stats = (
            asyncio.run(_run_judge(prof, results, default_tools, judge_concurrency, progress, judge_api_key))
            if prof.judge.enabled
            else None
        )
    summary = summarize(results)
    if stats is not None:
        summary["judge"] = {"calls": stats.calls, "findings": stats.findings, "errors": stats.errors}
        if stats.errors:
            console.print(f"[yellow]judge:[/yellow] {stats.errors} of {stats.calls} calls failed ({stats.first_error})")
    if any("ground_truth" in r.trajectory.extra for r in results):
        # Records with ground-truth actions (tau-bench runs) also get the detection-quality numbers.
        kinds = ToolKinds(prof, default_tools)
        summary["evaluation"] = score(results, kinds).report()
        summary["outcomes"] = outcome_tables([(name, r, kinds) for (name, _), r in zip(sources, results, strict=True)])
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
