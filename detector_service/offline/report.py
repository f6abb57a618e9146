"""``fama report``: the shadow report. What enforce mode would do to *this* traffic, before it is switched on.

For each source of verdicts, the share of failed and of successful sessions it would act on (a retry, rewrite or
block on any turn: what enforce mode changes), per kind of finding (``CATEGORY/detector``, per tool for rule
findings, as the profile's ``findings:`` keys) and per tool, with example session ids. Sources:

- ``recorded``: the verdicts observe mode recorded as the sessions ran (``verdicts`` of exported sessions, see
  :mod:`detector_service.offline.sessions`), i.e. the profile that was in force;
- ``current`` (``--profile``, zero-config without it) and ``candidate`` (``--candidate``): the sessions replayed
  through the detectors with that profile, as ``fama replay`` does.

Successful sessions acted on are the cost (a good run disturbed); failed sessions acted on, the chance to help.
Sessions without an outcome are counted, not scored. The input is read one session at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from detector_service.contract.profile import Profile, ProfileError, load_profile
from detector_service.contract.wire import Action, Finding
from detector_service.engine import Engine
from detector_service.offline.evaluation import ACTING
from detector_service.offline.replay import replay_one
from detector_service.offline.trajectories import Trajectory, TrajectoryError, load, load_tools
from detector_service.stakes import entry_key

EXAMPLES = 3
ACTION_NAMES = {a.value for a in Action}


@dataclass
class Counts:
    failed: int = 0
    succeeded: int = 0
    examples: dict[str, list[str]] = field(default_factory=lambda: {"failed": [], "succeeded": []})

    def add(self, outcome: str, session: str) -> None:
        if outcome == "failed":
            self.failed += 1
        else:
            self.succeeded += 1
        if len(self.examples[outcome]) < EXAMPLES:
            self.examples[outcome].append(session)


@dataclass
class Column:
    """What one source of verdicts would act on."""

    name: str
    acted: Counts = field(default_factory=Counts)
    kinds: dict[str, Counts] = field(default_factory=dict)
    tools: dict[str, Counts] = field(default_factory=dict)

    def add(self, outcome: str, session: str, findings: Iterable[Finding]) -> None:
        acting = [f for f in findings if f.action is not None and f.action.value in ACTING]
        if not acting:
            return
        self.acted.add(outcome, session)
        for key in {entry_key(f) for f in acting}:
            self.kinds.setdefault(key, Counts()).add(outcome, session)
        for tool in {f.tool_name or "none" for f in acting}:
            self.tools.setdefault(tool, Counts()).add(outcome, session)


@dataclass
class Report:
    columns: list[Column]
    failed: int = 0
    succeeded: int = 0
    without_outcome: int = 0
    with_records: int = 0  # sessions that carry recorded verdicts
    recorded_profiles: set[str] = field(default_factory=set)  # the profiles the recording proxy ran with

    def shares(self) -> dict[str, Any]:
        def share(n: int, of: int) -> float | None:
            return round(n / of, 3) if of else None

        def rows(counts: dict[str, Counts]) -> dict[str, Any]:
            return {
                key: {
                    "failed": c.failed,
                    "succeeded": c.succeeded,
                    "failed_share": share(c.failed, self.failed),
                    "succeeded_share": share(c.succeeded, self.succeeded),
                    "examples": c.examples,
                }
                for key, c in sorted(counts.items(), key=lambda kv: (-kv[1].succeeded, -kv[1].failed, kv[0]))
            }

        return {
            "sessions": {
                "failed": self.failed,
                "succeeded": self.succeeded,
                "without_outcome": self.without_outcome,
                "with_recorded_verdicts": self.with_records,
                "recorded_profiles": sorted(self.recorded_profiles),
            },
            "sources": {
                c.name: {
                    "failed_acted": c.acted.failed,
                    "succeeded_acted": c.acted.succeeded,
                    "failed_share": share(c.acted.failed, self.failed),
                    "succeeded_share": share(c.acted.succeeded, self.succeeded),
                    "examples": c.acted.examples,
                    "by_kind": rows(c.kinds),
                    "by_tool": rows(c.tools),
                }
                for c in self.columns
            },
        }


def recorded_findings(trajectory: Trajectory) -> list[Finding] | None:
    """The findings of the verdicts recorded with an exported session (None when it carries none), each with the
    action its verdict asked for when the finding names none."""
    verdicts = trajectory.extra.get("verdicts")
    if not isinstance(verdicts, list):
        return None
    out: list[Finding] = []
    for verdict in verdicts:
        if not isinstance(verdict, dict):
            continue
        for raw in verdict.get("findings") or ():
            try:
                finding = Finding.model_validate(raw)
            except ValidationError:
                continue  # recorded by another version: left out rather than guessed
            if finding.action is None and verdict.get("action") in ACTION_NAMES:
                finding.action = Action(verdict["action"])
            out.append(finding)
    return out


def shadow_report(
    trajectories: Iterable[Trajectory], profiles: Sequence[tuple[str, Profile]], tools: list[dict[str, Any]]
) -> Report:
    engines = [(Column(name), Engine(profile)) for name, profile in profiles]
    recorded = Column("recorded")
    report = Report([recorded, *(column for column, _ in engines)])
    for t in trajectories:
        if t.reward is None:
            report.without_outcome += 1
            continue
        outcome = "failed" if t.reward < 1.0 else "succeeded"
        report.failed += outcome == "failed"
        report.succeeded += outcome == "succeeded"
        found = recorded_findings(t)
        if found is not None:
            report.with_records += 1
            recorded.add(outcome, t.id, found)
            if isinstance(t.extra.get("profile"), str):
                report.recorded_profiles.add(t.extra["profile"])
        for column, engine in engines:
            column.add(outcome, t.id, (f.finding for f in replay_one(engine, t, tools).flags))
    if not report.with_records:
        report.columns.remove(recorded)
    return report


def _trajectories(files: Sequence[Path]) -> Iterator[Trajectory]:
    for path in files:
        yield from load(Path(path))


def _pct(n: int, of: int) -> str:
    return f"{n}/{of} ({n / of:.0%})" if of else "-"


def _print(report: Report, console: Console) -> None:
    console.print(
        f"fama report: {report.failed + report.succeeded} sessions with an outcome ({report.failed} failed, "
        f"{report.succeeded} succeeded), {report.without_outcome} without"
        + (f"; recorded with profile {', '.join(sorted(report.recorded_profiles))}" if report.recorded_profiles else "")
    )
    table = Table(title="sessions enforce mode would act on (retry, rewrite or block on any turn)")
    for column in ("source", "failed sessions", "successful sessions", "examples (successful first)"):
        table.add_column(column, overflow="fold")
    for c in report.columns:
        examples = ", ".join([*c.acted.examples["succeeded"], *c.acted.examples["failed"]][:EXAMPLES])
        table.add_row(c.name, _pct(c.acted.failed, report.failed), _pct(c.acted.succeeded, report.succeeded), examples)
    console.print(table)
    for c in report.columns:
        for title, rows in (("finding", c.kinds), ("tool", c.tools)):
            if not rows:
                continue
            detail = Table(title=f"{c.name}: by {title}")
            for column in (title, "failed", "successful", "successful sessions acted on", "failed sessions acted on"):
                detail.add_column(column, overflow="fold")
            for key, n in sorted(rows.items(), key=lambda kv: (-kv[1].succeeded, -kv[1].failed, kv[0])):
                detail.add_row(
                    key,
                    _pct(n.failed, report.failed),
                    _pct(n.succeeded, report.succeeded),
                    ", ".join(n.examples["succeeded"]),
                    ", ".join(n.examples["failed"]),
                )
            console.print(detail)


def report_command(
    files: Sequence[Path],
    *,
    profile: Path | None = None,
    candidate: Path | None = None,
    tools: Path | None = None,
    json_out: Path | None = None,
) -> int:
    errors = Console(stderr=True)
    try:
        profiles = [("current", load_profile(profile))]
        if candidate is not None:
            profiles.append(("candidate", load_profile(candidate)))
        report = shadow_report(_trajectories(files), profiles, load_tools(tools))
    except (TrajectoryError, ProfileError, OSError, orjson.JSONDecodeError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        return 2
    if report.failed + report.succeeded == 0:
        errors.print("[red]error:[/red] no session carries an outcome: there is nothing to compare enforce mode with")
        return 2
    _print(report, Console(file=sys.stdout, width=160))
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(report.shares(), option=orjson.OPT_INDENT_2))
    return 0
