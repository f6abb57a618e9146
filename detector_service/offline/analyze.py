"""``fama analyze``: stage-1 failure analysis over trajectories with outcomes; writes a profile.

Each failed trajectory is attributed to one primary category: the category of its earliest flag (the
first thing that went wrong; later flags are often consequences). The specialized agents that address
the categories found are then chosen as a minimal cover of the attributed failures:

- DCV -> DCE + Verifier: DCE puts the policy rule that governs the pending action in front of the model,
  and the Verifier's pre-write checklist (confirmed? grounded? allowed?) catches what slips through.
- WRCO -> TOR + Memory: misread values come from long, nested tool outputs; TOR flattens them into an
  enumerated list and Memory keeps the ids and amounts already established.
- IFU -> Planner + TSA: early stops come from losing track of open requests (Planner's checklist) or
  not knowing which tool fits next (TSA).
- CM -> Planner: restating the user's requests as sub-goals keeps actions tied to what was asked.
- LOOP -> Memory: repeating a call means forgetting its result; Memory keeps results at hand.
- MTC -> none: malformed calls are repaired or retried by the proxy itself; TSA only when the model
  keeps calling tools that do not exist.

Categories are covered in order of attributed failures until ``COVERAGE`` of them is addressed, so a
category behind one stray failure does not switch on agents for every turn. Categories that also flag
many passed runs get ``guide`` instead of ``retry`` as their action.

The input must carry outcomes: at least ``MIN_OUTCOMES`` runs with a reward, ``MIN_EACH`` of them failed and
``MIN_EACH`` succeeded (sessions exported with ``fama sessions export`` carry the outcome their client reported).
Fewer, and the shares a calibration compares are noise: the command refuses. Tools come from ``--tools`` and from
the records themselves (exported sessions carry the tools their requests declared).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from detector_service.contract.profile import (
    AgentName,
    DetectorConfig,
    Profile,
    ProfileError,
    ToolKind,
    dump_profile,
    load_profile,
)
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import Action, Category, Severity
from detector_service.engine import Engine
from detector_service.offline.calibrate import calibrate
from detector_service.offline.replay import replay
from detector_service.offline.trajectories import Replayed, Trajectory, TrajectoryError, load, load_tools
from detector_service.policytext import extract_rules
from detector_service.turn import text_of, tool_calls_of

COVERAGE = 0.8
NOISY_PASSED_SHARE = 0.1
MIN_OUTCOMES = 20
MIN_EACH = 5

AGENTS_FOR: dict[Category, list[AgentName]] = {
    Category.DCV: [AgentName.DCE, AgentName.VERIFIER],
    Category.WRCO: [AgentName.TOR, AgentName.MEMORY],
    Category.IFU: [AgentName.PLANNER, AgentName.TSA],
    Category.CM: [AgentName.PLANNER],
    Category.LOOP: [AgentName.MEMORY],
    Category.MTC: [],
}
_SEVERITY_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def primary_category(result: Replayed) -> Category | None:
    if not result.flags:
        return None
    first = min(result.flags, key=lambda f: (f.turn, _SEVERITY_RANK[f.finding.severity]))
    return first.finding.category


def select_agents(primary: Counter[Category]) -> list[AgentName]:
    total = sum(primary.values())
    chosen: list[AgentName] = []
    covered = 0
    for category, count in primary.most_common():
        if total and covered / total >= COVERAGE:
            break
        covered += count
        for agent in AGENTS_FOR[category]:
            if agent not in chosen:
                chosen.append(agent)
    return chosen


def _policy(trajectories: Sequence[Trajectory]) -> str:
    for t in trajectories:
        for m in t.messages:
            if m.get("role") in ("system", "developer"):
                return text_of(m.get("content"))
    return ""


def build_profile(trajectories: Sequence[Trajectory], tools: list[dict[str, Any]]) -> tuple[Profile, dict[str, Any]]:
    base = Profile()
    results = replay(Engine(base), trajectories, tools)
    primary: Counter[Category] = Counter()
    flagged_passed: Counter[Category] = Counter()
    flagged_failed: Counter[Category] = Counter()
    failed = passed = 0
    for r in results:
        if r.trajectory.reward is None:
            continue
        cats = {f.finding.category for f in r.flags}
        if r.trajectory.reward < 1.0:
            failed += 1
            flagged_failed.update(cats)
            cat = primary_category(r)
            if cat is not None:
                primary[cat] += 1
        else:
            passed += 1
            flagged_passed.update(cats)
    actions = dict(base.actions)
    for cat in Category:
        if passed and flagged_passed[cat] / passed > NOISY_PASSED_SHARE:
            actions[cat] = Action.GUIDE
    all_tools = {t for r in trajectories for t in _tool_names(r)} | {_name(t) for t in tools}
    kinds = ToolKinds(base, declared_tools(trajectories, tools))
    tool_kinds = {name: kinds.kind(name) for name in sorted(n for n in all_tools if n)}
    writes = [n for n, k in tool_kinds.items() if k is ToolKind.WRITE]
    rules = extract_rules(_policy(trajectories), writes)
    profile = Profile(
        name="analyzed",
        agents=select_agents(primary),
        detectors={"dcv": DetectorConfig(settings={"confirm_all_writes": not rules})},
        actions=actions,
        tools=tool_kinds,
        rules=rules,
    )
    report = {
        "trajectories": len(results),
        "failed": failed,
        "passed": passed,
        "primary": {c.value: n for c, n in primary.most_common()},
        "flagged_failed": {c.value: n for c, n in flagged_failed.items()},
        "flagged_passed": {c.value: n for c, n in flagged_passed.items()},
    }
    return profile, report


def _name(tool: dict[str, Any]) -> str:
    fn = tool.get("function")
    holder: dict[str, Any] = fn if isinstance(fn, dict) else tool
    return str(holder.get("name") or "")


def declared_tools(trajectories: Sequence[Trajectory], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tools``, then each tool the records declare that ``tools`` does not name (first declaration wins)."""
    out = list(tools)
    names = {_name(t) for t in tools}
    for r in trajectories:
        for tool in r.tools or ():
            if isinstance(tool, dict) and _name(tool) not in names:
                names.add(_name(tool))
                out.append(tool)
    return out


def too_few_outcomes(trajectories: Sequence[Trajectory]) -> str | None:
    """Why the runs cannot be calibrated on (too few carry an outcome), or None."""
    failed = sum(1 for t in trajectories if t.reward is not None and t.reward < 1.0)
    passed = sum(1 for t in trajectories if t.reward is not None and t.reward >= 1.0)
    if failed + passed >= MIN_OUTCOMES and min(failed, passed) >= MIN_EACH:
        return None
    return (
        f"too few runs carry an outcome: {failed} failed and {passed} succeeded of {len(trajectories)}; "
        f"fama analyze needs at least {MIN_OUTCOMES} with an outcome, {MIN_EACH} failed and {MIN_EACH} succeeded. "
        "Report outcomes (POST /v1/fama/sessions/<id>/outcome) and export the sessions again."
    )


def _tool_names(t: Trajectory) -> set[str]:
    out = {_name(x) for x in t.tools or []}
    for m in t.messages:
        for call in tool_calls_of(m):
            out.add(str((call.get("function") or {}).get("name") or ""))
    return out


def analyze_command(
    files: Sequence[Path],
    *,
    tools: Path | None = None,
    out: Path,
    profile: Path | None = None,
    leave_out: Sequence[str] = (),
) -> int:
    """Write a calibrated profile: ``profile`` (or one built from the runs' policy) with ``findings:`` entries
    counted on the runs of ``files``, leaving out the runs of the models in ``leave_out``."""
    console = Console(stderr=True)
    try:
        default_tools = load_tools(tools)
        trajectories = [t for path in files for t in load(Path(path))]
        base = load_profile(profile) if profile is not None else None
    except (TrajectoryError, ProfileError, OSError, orjson.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    refusal = too_few_outcomes(trajectories)
    if refusal is not None:
        console.print(f"[red]error:[/red] {refusal}")
        return 2
    kept = [t for t in trajectories if str(t.extra.get("agent_model")) not in set(leave_out)]
    built, report = build_profile(kept, default_tools)
    calibrated = calibrate(base if base is not None else built, kept, default_tools)
    out.write_text(dump_profile(calibrated), encoding="utf-8")
    try:
        load_profile(out)  # what we write must be what serve and replay accept
    except ProfileError as exc:
        console.print(f"[red]error:[/red] the written profile does not load: {exc}")
        return 1
    table = Table(title="fama analyze: primary failure categories")
    table.add_column("category")
    table.add_column("failed runs (primary)", justify="right")
    table.add_column("agents")
    for cat, n in report["primary"].items():
        table.add_row(cat, str(n), ", ".join(a.value for a in AGENTS_FOR[Category(cat)]) or "-")
    Console().print(table)
    findings = Table(title="fama analyze: acting findings on failed / passed runs")
    findings.add_column("finding")
    findings.add_column("failed", justify="right")
    findings.add_column("passed", justify="right")
    findings.add_column("action")
    for key, entry in calibrated.findings.items():
        findings.add_row(key, str(entry.failed), str(entry.passed), entry.action.value)
    Console().print(findings)
    Console().print(
        f"{report['failed']} failed, {report['passed']} passed; agents: "
        f"{', '.join(a.value for a in calibrated.agents) or 'none'}; rules: {len(calibrated.rules)}; "
        f"findings calibrated: {len(calibrated.findings)}; written to {out}"
    )
    return 0
