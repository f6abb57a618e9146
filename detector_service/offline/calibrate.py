"""Calibration from outcomes (FAMA stage 1): which findings act and which only guide, from recorded runs.

Runs are replayed with a profile whose ``findings:`` entries are cleared, so each finding gets the action
the decision table (``detector_service.stakes``) gives it. For each kind of finding (``CATEGORY/detector``,
per tool for rule findings) the failed and passed runs on which it *acts* are counted. A finding keeps
acting when it fires clearly more often on failed runs than on passed ones; otherwise it is demoted to
``guide`` (it still reaches the model as guidance for its next turn):

- built-in detectors: demoted when the share of passed runs it fires on exceeds ``MAX_PASSED_SHARE`` or is
  more than 1 / ``MIN_LIFT`` of the share of failed runs;
- rules extracted from policy text (a profile's or the policy's own ``rules``): the same with the stricter
  ``MIN_LIFT_RULE``, so a rule that fires on passed runs about as often as the policy is broken on failed
  ones is demoted automatically;
- fewer than ``MIN_RUNS`` runs in all: no entry, the table decides.

Counts per model and domain are kept in the report so a reader sees where an entry comes from; the
entries themselves pool the runs given. ``fama evaluate`` calibrates leaving each model out in turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from detector_service.contract.profile import Calibration, FindingEntry, Profile
from detector_service.contract.wire import ACTION_STRENGTH, Action
from detector_service.engine import Engine
from detector_service.offline.evaluation import ACTING
from detector_service.offline.replay import replay
from detector_service.offline.trajectories import Replayed, Trajectory
from detector_service.stakes import RULE_DETECTORS, entry_key

MIN_RUNS = 3
MIN_LIFT = 2.0
MIN_LIFT_RULE = 3.0
MAX_PASSED_SHARE = 0.05
RULE_TEXT = (
    f"act while a finding fires on at most {MAX_PASSED_SHARE:.0%} of passed runs and at least {MIN_LIFT:g}x "
    f"(rules from policy text: {MIN_LIFT_RULE:g}x) as often on failed runs as on passed ones; else guide"
)


@dataclass
class Tally:
    failed: int = 0
    passed: int = 0
    strongest: Action = Action.GUIDE
    by_group: Counter[str] = field(default_factory=Counter)  # "model|domain|failed" -> runs


def tally(results: Iterable[Replayed]) -> tuple[dict[str, Tally], int, int]:
    """Per kind of finding, the runs it acts on; and the numbers of failed and passed runs."""
    out: dict[str, Tally] = {}
    failed_runs = passed_runs = 0
    for r in results:
        if r.trajectory.reward is None:
            continue
        failed = r.trajectory.reward < 1.0
        failed_runs += failed
        passed_runs += not failed
        seen: dict[str, Action] = {}
        for f in r.flags:
            if f.action in ACTING:
                key = entry_key(f.finding)
                action = Action(f.action)
                if key not in seen or ACTION_STRENGTH[action] > ACTION_STRENGTH[seen[key]]:
                    seen[key] = action
        group = f"{r.trajectory.extra.get('agent_model', '?')}|{r.trajectory.extra.get('domain', '?')}"
        for key, action in seen.items():
            t = out.setdefault(key, Tally())
            t.failed += failed
            t.passed += not failed
            if ACTION_STRENGTH[action] > ACTION_STRENGTH[t.strongest]:
                t.strongest = action
            t.by_group[f"{group}|{'failed' if failed else 'passed'}"] += 1
    return out, failed_runs, passed_runs


def decide(key: str, t: Tally, failed_runs: int, passed_runs: int) -> FindingEntry | None:
    if t.failed + t.passed < MIN_RUNS:
        return None
    failed_share = t.failed / failed_runs if failed_runs else 0.0
    passed_share = t.passed / passed_runs if passed_runs else 0.0
    lift = MIN_LIFT_RULE if key.split("/")[1] in RULE_DETECTORS else MIN_LIFT
    acts = passed_share <= MAX_PASSED_SHARE and failed_share >= lift * passed_share
    why = None if acts else f"fires on {t.passed} of {passed_runs} passed runs and {t.failed} of {failed_runs} failed"
    return FindingEntry(action=t.strongest if acts else Action.GUIDE, failed=t.failed, passed=t.passed, why=why)


def calibrate(profile: Profile, trajectories: Sequence[Trajectory], tools: list[dict[str, Any]]) -> Profile:
    """``profile`` with its ``findings:`` entries and ``calibration`` recomputed from ``trajectories``."""
    base = profile.model_copy(update={"findings": {}, "calibration": None})
    # The table alone is counted: a monitor the profile carries is trained afterwards, on top of these entries.
    tallies, failed_runs, passed_runs = tally(
        replay(Engine(base.model_copy(update={"monitor": None})), trajectories, tools)
    )
    entries = {}
    for key in sorted(tallies):
        entry = decide(key, tallies[key], failed_runs, passed_runs)
        if entry is not None:
            entries[key] = entry
    models = sorted({str(t.extra.get("agent_model")) for t in trajectories if t.extra.get("agent_model")})
    calibration = Calibration(failed=failed_runs, passed=passed_runs, models=models, rule=RULE_TEXT)
    return base.model_copy(update={"findings": entries, "calibration": calibration})


MARKER = "# --- calibrated from outcomes by fama analyze / fama evaluate --calibrate; do not edit below ---"


def with_calibration(text: str, profile: Profile) -> str:
    """A profile file's hand-written text (everything before ``MARKER``) followed by ``profile``'s calibrated
    ``findings:`` and ``calibration:``, so rewriting a shipped profile keeps its comments."""
    head = text.split(MARKER, 1)[0].rstrip() + "\n"
    data = profile.model_dump(mode="json", include={"calibration", "findings"}, exclude_none=True)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    return f"{head}{MARKER}\n{body}"


def report_rows(tallies: dict[str, Tally]) -> list[tuple[str, str]]:
    """(key, per model/domain counts) rows for the printed report."""
    rows = []
    for key, t in sorted(tallies.items()):
        parts = [f"{g}={n}" for g, n in sorted(t.by_group.items())]
        rows.append((key, ", ".join(parts)))
    return rows
