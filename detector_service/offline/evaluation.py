"""How well replay flags match recorded outcomes: the numbers the detectors are judged by.

``outcomes`` / ``grouped`` give the view enforce mode is judged by, on *acting* flags (retry, rewrite, block)
and on all flags: failed runs flagged, passed runs flagged, and prevention (among failed runs with a harmful
write, a write-tool call matching no ground-truth action exactly, the share whose first flag comes at or
before it). ``score`` below counts acting flags too, with the finer notes that follow.

For each trajectory with a reward and ground-truth actions:
- flagged: at least one flag;
- early: the first flag comes at or before the first *deviating write*, the first write call whose
  name and arguments match no ground-truth action. A failed run without a deviating write failed by
  omission or by what it said, which shows only at the end, so any flag counts as early there.

A passed run can still hold a mistake the environment happened to absorb: a write the ground truth
does not contain, which the tool rejected with an error, so the database never changed. Flags that all
sit on such rejected writes are counted apart (``passed_flagged_on_deviating_writes``): they are detections, not
false alarms, though the reward does not show it. So are, often, flags on passed runs whose ground truth
has no write at all: a database-based reward cannot see a request left unfulfilled there (the data's
README says so of needless hand-offs); those runs are counted too (``passed_flagged_no_write_in_truth``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from detector_service.contract.profile import ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.offline.trajectories import Replayed
from detector_service.turn import is_error_output, norm, parse_json, tool_calls_of

# What enforce mode changes: the flags the supervisor is judged by (``outcomes`` also reports every flag).
ACTING = frozenset({"retry", "rewrite", "block"})


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if value is None:
        return None
    return norm(value)


def _key(name: str, args: Mapping[str, Any]) -> str:
    return name + orjson.dumps(_canonical(dict(args))).decode()


def ground_truth_keys(ground_truth: Mapping[str, Any]) -> set[str]:
    out = set()
    for action in ground_truth.get("actions") or []:
        args = action.get("kwargs", action.get("arguments")) or {}
        out.add(_key(str(action.get("name")), args))
    return out


def _deviating_writes(
    messages: Sequence[Mapping[str, Any]], kinds: ToolKinds, truth: set[str]
) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(message index, call) of each write call whose name and arguments match no ground-truth action."""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        for call in tool_calls_of(m):
            fn = call.get("function") or {}
            name = str(fn.get("name"))
            if kinds.kind(name) is not ToolKind.WRITE:
                continue
            raw = fn.get("arguments")
            args = raw if isinstance(raw, dict) else parse_json(str(raw or ""))
            if not isinstance(args, dict) or _key(name, args) not in truth:
                yield i, call


def _rejected_deviating_writes(messages: Sequence[Mapping[str, Any]], kinds: ToolKinds, truth: set[str]) -> set[int]:
    """Indices of assistant messages holding a write call that matches no ground-truth action and was rejected."""
    failed = {str(m.get("tool_call_id")) for m in messages if m.get("role") == "tool" and is_error_output(m)}
    return {i for i, call in _deviating_writes(messages, kinds, truth) if str(call.get("id")) in failed}


def first_deviating_write(messages: Sequence[Mapping[str, Any]], kinds: ToolKinds, truth: set[str]) -> int | None:
    return next((i for i, _ in _deviating_writes(messages, kinds, truth)), None)


@dataclass
class Score:
    failed: int = 0
    passed: int = 0
    failed_flagged: int = 0
    passed_flagged: int = 0
    failed_early: int = 0
    passed_flagged_on_deviating_writes: int = 0
    passed_flagged_no_write_in_truth: int = 0
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "failed": self.failed,
            "passed": self.passed,
            **self.rates(),
            "passed_flagged_runs": self.passed_flagged,
            "passed_flagged_on_deviating_writes": self.passed_flagged_on_deviating_writes,
            "passed_flagged_no_write_in_truth": self.passed_flagged_no_write_in_truth,
            "by_category": self.by_category,
        }

    def rates(self) -> dict[str, float]:
        return {
            "failed_flagged": self.failed_flagged / self.failed if self.failed else 0.0,
            "passed_flagged": self.passed_flagged / self.passed if self.passed else 0.0,
            "failed_early": self.failed_early / self.failed if self.failed else 0.0,
        }


def score(results: Iterable[Replayed], kinds: ToolKinds) -> Score:
    """Acting flags only (retry / rewrite / block); only trajectories with a reward count; ``early`` needs
    ``ground_truth.actions`` in the record."""
    out = Score()
    for r in results:
        reward = r.trajectory.reward
        if reward is None:
            continue
        failed = reward < 1.0
        r = Replayed(
            r.trajectory, [f for f in r.flags if f.action in ACTING], r.turns, r.messages
        )  # what enforce mode changes
        flagged = bool(r.flags)
        if failed:
            out.failed += 1
            out.failed_flagged += flagged
        else:
            out.passed += 1
            out.passed_flagged += flagged
            if flagged and "ground_truth" in r.trajectory.extra:
                gt = r.trajectory.extra.get("ground_truth") or {}
                deviating = _rejected_deviating_writes(r.messages, kinds, ground_truth_keys(gt))
                out.passed_flagged_on_deviating_writes += all(f.turn in deviating for f in r.flags)
                out.passed_flagged_no_write_in_truth += not any(
                    kinds.kind(str(a.get("name"))) is ToolKind.WRITE for a in gt.get("actions") or []
                )
        for cat in {f.finding.category.value for f in r.flags}:
            row = out.by_category.setdefault(cat, {"failed": 0, "passed": 0, "failed_early": 0})
            row["failed" if failed else "passed"] += 1
        if failed and flagged:
            gt = r.trajectory.extra.get("ground_truth") or {}
            limit = first_deviating_write(r.messages, kinds, ground_truth_keys(gt))
            first = min(f.turn for f in r.flags)
            if limit is None or first <= limit:
                out.failed_early += 1
            for cat in {f.finding.category.value for f in r.flags}:
                first_cat = min(f.turn for f in r.flags if f.finding.category.value == cat)
                if limit is None or first_cat <= limit:
                    out.by_category[cat]["failed_early"] += 1
    return out


def _exact(value: Any) -> str:
    if isinstance(value, str):
        parsed = parse_json(value)
        if parsed is None and value.strip() not in ("null",):
            return value
        value = parsed
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def harm_index(messages: Sequence[Mapping[str, Any]], kinds: ToolKinds, ground_truth: Mapping[str, Any]) -> int | None:
    """Index of the first assistant message holding a *harmful write*: a call of a write tool whose (name,
    arguments as parsed JSON) matches no ground-truth action exactly."""
    truth = {
        (str(a.get("name")), _exact(a.get("kwargs", a.get("arguments", {})))) for a in ground_truth.get("actions") or []
    }
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        for call in tool_calls_of(m):
            fn = call.get("function") or {}
            name = str(fn.get("name"))
            if kinds.kind(name) is ToolKind.WRITE and (name, _exact(fn.get("arguments", {}))) not in truth:
                return i
    return None


@dataclass
class Outcomes:
    """Failed / passed runs flagged and prevention, as shares (``prevention``: among failed runs with a harmful
    write, those whose first flag comes at or before the first harmful write)."""

    failed: int = 0
    passed: int = 0
    failed_flagged: int = 0
    passed_flagged: int = 0
    failed_with_harm: int = 0
    prevented: int = 0

    def add(self, failed: bool, turns: Sequence[int], harm: int | None) -> None:
        if failed:
            self.failed += 1
            self.failed_flagged += bool(turns)
            if harm is not None:
                self.failed_with_harm += 1
                self.prevented += bool(turns) and min(turns) <= harm
        else:
            self.passed += 1
            self.passed_flagged += bool(turns)

    def shares(self) -> dict[str, Any]:
        def r(n: int, d: int) -> float | None:
            return round(n / d, 3) if d else None

        return {
            "failed_flagged": r(self.failed_flagged, self.failed),
            "passed_flagged": r(self.passed_flagged, self.passed),
            "prevention": r(self.prevented, self.failed_with_harm),
            "n_failed": self.failed,
            "n_passed": self.passed,
            "n_harm": self.failed_with_harm,
        }


def outcomes(rows: Iterable[tuple[Replayed, ToolKinds]]) -> dict[str, Outcomes]:
    """``acting`` and ``all`` outcome counts over the runs with a reward; ``rows`` pairs each run with the
    tool kinds of its domain (what is a write)."""
    views = {"acting": Outcomes(), "all": Outcomes()}
    for r, kinds in rows:
        reward = r.trajectory.reward
        if reward is None:
            continue
        failed = reward < 1.0
        gt = r.trajectory.extra.get("ground_truth") or {}
        harm = harm_index(r.messages, kinds, gt) if failed and isinstance(gt, dict) else None
        views["acting"].add(failed, [f.turn for f in r.flags if f.action in ACTING], harm)
        views["all"].add(failed, [f.turn for f in r.flags], harm)
    return views


def grouped(rows: Iterable[tuple[str, Replayed, ToolKinds]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Outcome shares per group (a file, a model, a domain): ``{group: {"acting": ..., "all": ...}}``."""
    groups: dict[str, list[tuple[Replayed, ToolKinds]]] = {}
    for name, r, kinds in rows:
        groups.setdefault(name, []).append((r, kinds))
    return {name: {view: o.shares() for view, o in outcomes(rs).items()} for name, rs in groups.items()}


def outcome_tables(rows: Sequence[tuple[str, Replayed, ToolKinds]]) -> dict[str, Any]:
    """Pooled, per file, per model and per domain outcome shares of ``(file name, run, kinds)`` rows."""

    def by(attr: str) -> list[tuple[str, Replayed, ToolKinds]]:
        return [(str(r.trajectory.extra.get(attr, "?")), r, k) for _, r, k in rows]

    return {
        "pooled": {view: o.shares() for view, o in outcomes((r, k) for _, r, k in rows).items()},
        "per_file": grouped(rows),
        "per_model": grouped(by("agent_model")),
        "per_domain": grouped(by("domain")),
    }
