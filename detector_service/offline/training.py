"""Training the risk monitor from runs with outcomes, and the grouped cross-validation that decides whether it acts.

The runs are replayed with the profile (its calibrated table, no monitor), and every assistant turn becomes one row:
its features (``detector_service.monitor.features``), labelled with how its run ended (failed = 1), as in a
prefix-warning monitor trained on terminal outcomes. A scikit-learn logistic regression is fitted on standardized
features; what is kept is numbers (centers, scales, coefficients, intercept), scored online without the library.

The threshold comes from grouped cross-validation: runs of the same task (or, where the task is unknown, sharing a
ground truth or a first user request) stay in one fold, so every run is scored by a model that never saw its task.
On those out-of-fold risks a run is flagged by the table (its acting flags) or by the monitor (a WRITE/END turn at
or over the threshold where the monitor does not abstain). A threshold keeps the share of passed runs flagged
within the budget (the profile's ``monitor.budget``, default 8%). Each fit puts its risks on its own scale, so
the threshold must keep the budget whichever fit scores the training runs: the out-of-fold risks, each fold's model
and the model written, each over all training runs; the highest of those lowest thresholds is kept (one fit's
scale is one draw, and the model written must not flag its own passed runs over the budget).

The monitor is switched on only when, at that threshold, cross-validation catches at least ``MIN_GAIN`` more
failed runs than the table alone, and the share of failed runs it adds is at least ``MIN_LIFT`` times the share of
passed runs it adds (the rule ``calibrate`` holds a finding to) on the pessimistic side of each: the lower
bound of the first against the upper bound of the second (Wilson intervals, one standard error). A gain of two
runs out of forty proves nothing; otherwise it is written off, with the reason. Fewer than ``MIN_PASSED`` passed
runs cannot measure a budget of a few percent: no monitor is trained from them, and a harness (native calls,
ReAct text) with fewer passed training runs is one the written monitor abstains on.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from detector_service.contract.profile import MonitorConfig, MonitorFigures, Profile
from detector_service.engine import Engine
from detector_service.monitor.features import FEATURE_VERSION, FEATURES
from detector_service.monitor.model import fingerprint
from detector_service.monitor.score import abstains, probability
from detector_service.offline.evaluation import ACTING
from detector_service.offline.replay import replay
from detector_service.offline.trajectories import Replayed, Trajectory
from detector_service.turn import text_of

FOLDS = 5
MIN_GAIN = 2  # failed runs cross-validation must catch beyond the table before the monitor acts
MIN_LIFT = 2.0  # and as a share of failed runs, at least this many times the share of passed runs it adds
MIN_TURNS = 20  # training turns a pending tool or a tool set needs before the monitor judges it
MIN_PASSED = 20  # passed training runs before a budget of a few percent can be measured at all
MODEL_MIN_PASSED = 10  # passed runs of one agent model before the budget is also held for that model alone
CONFIDENCE = 0.6827  # Wilson intervals of one standard error either side, for the switch
C = 1.0  # inverse regularization strength of the logistic regression


def group_of(t: Trajectory) -> str:
    """The cross-validation group of a run: its task (task ids are per benchmark and domain), else its ground truth,
    else its first user request."""
    task = t.extra.get("task_id")
    if task is not None:
        return f"task:{t.extra.get('source_format', '')}:{t.extra.get('domain', '')}:{task}"
    truth = t.extra.get("ground_truth")
    if truth:
        return "truth:" + hashlib.sha256(orjson.dumps(truth, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    first = next((text_of(m.get("content")) for m in t.messages if m.get("role") == "user"), "")
    return "request:" + hashlib.sha256(first.strip().lower().encode()).hexdigest()[:16]


@dataclass(slots=True)
class _Run:
    replayed: Replayed
    failed: bool
    group: str
    table: bool  # the table acts on it
    model: str  # the agent model that ran it ("?" when the record does not say)

    @property
    def rows(self) -> int:
        return len(self.replayed.features)


def _fit(rows: Sequence[list[float]], labels: Sequence[int]) -> MonitorConfig | None:
    """A logistic regression on standardized ``rows`` as a monitor's numbers (None: one class only)."""
    if len(set(labels)) < 2:
        return None
    from sklearn.linear_model import LogisticRegression  # training only: serving never imports the library

    n = len(rows)
    center = [sum(r[j] for r in rows) / n for j in range(len(FEATURES))]
    scale = []
    for j in range(len(FEATURES)):
        var = sum((r[j] - center[j]) ** 2 for r in rows) / n
        scale.append(math.sqrt(var) if var > 1e-12 else 1.0)
    z = [[(r[j] - center[j]) / scale[j] for j in range(len(FEATURES))] for r in rows]
    model = LogisticRegression(C=C, max_iter=2000).fit(z, list(labels))
    return MonitorConfig(
        feature_version=FEATURE_VERSION,
        features=list(FEATURES),
        center=[round(v, 6) for v in center],
        scale=[round(v, 6) for v in scale],
        coefficients=[round(float(w), 6) for w in model.coef_[0]],
        intercept=round(float(model.intercept_[0]), 6),
    )


def _support(runs: Sequence[_Run]) -> dict[str, dict[str, int]]:
    """Training turns per pending tool, declared tool and dialect; passed runs per dialect."""
    tools: Counter[str] = Counter()
    declared: Counter[str] = Counter()
    dialects: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    for r in runs:
        written = set()
        for f in r.replayed.features:
            if f.eligible:
                tools.update(set(f.pending))
                declared.update(f.declared)
                dialects[f.dialect] += 1
                written.add(f.dialect)
        if not r.failed:
            passed.update(written)
    counts = {"tools": tools, "declared": declared, "dialects": dialects, "passed": passed}
    return {name: dict(sorted(c.items())) for name, c in counts.items()}


def _train(runs: Sequence[_Run], min_turns: int) -> MonitorConfig | None:
    # Trained where it may act (WRITE/END turns): what a look-up's prefix says matters only at the next write.
    rows = [f.x for r in runs for f in r.replayed.features if f.eligible]
    labels = [int(r.failed) for r in runs for f in r.replayed.features if f.eligible]
    fitted = _fit(rows, labels)
    if fitted is None:
        return None
    update: dict[str, Any] = {**_support(runs), "min_turns": min_turns, "min_passed": MIN_PASSED}
    return fitted.model_copy(update=update)


def _folds(runs: Sequence[_Run], folds: int) -> list[list[int]]:
    """Indices of ``runs`` per fold, whole groups to a fold, by a stable hash of the group."""
    groups = sorted({r.group for r in runs}, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    k = max(2, min(folds, len(groups)))
    fold_of = {g: i % k for i, g in enumerate(groups)}
    out: list[list[int]] = [[] for _ in range(k)]
    for i, r in enumerate(runs):
        out[fold_of[r.group]].append(i)
    return out


def _risks(model: MonitorConfig | None, run: _Run) -> list[tuple[float, bool]]:
    """Per collected turn of ``run``: (risk under ``model``, whether the monitor may act there)."""
    if model is None:
        return [(0.0, False) for _ in run.replayed.features]
    return [
        (probability(model, f.x)[0], f.eligible and abstains(model, f.pending, f.declared, f.dialect) is None)
        for f in run.replayed.features
    ]


def _peak(risks: Sequence[tuple[float, bool]]) -> float | None:
    """A run's highest risk on a turn where the monitor may act (None: no such turn)."""
    return max((v for v, ok in risks if ok), default=None)


def out_of_fold(
    runs: Sequence[_Run], folds: int, min_turns: int
) -> tuple[list[list[tuple[float, bool]]], list[MonitorConfig | None]]:
    """Per run, per collected turn: (out-of-fold risk, whether the monitor may act there); and each fold's model."""
    out: list[list[tuple[float, bool]]] = [[] for _ in runs]
    models = []
    for held in _folds(runs, folds):
        inside = set(held)
        model = _train([r for i, r in enumerate(runs) if i not in inside], min_turns)
        models.append(model)
        for i in held:
            out[i] = _risks(model, runs[i])
    return out, models


def _auprc(runs: Sequence[_Run], risks: Sequence[Sequence[tuple[float, bool]]]) -> float | None:
    labels = [int(r.failed) for r, rs in zip(runs, risks, strict=True) for _ in rs]
    scores = [v for rs in risks for v, _ in rs]
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import average_precision_score

    return round(float(average_precision_score(labels, scores)), 3)


def choose_threshold(runs: Sequence[_Run], peaks: Sequence[float | None], budget: float) -> tuple[float | None, str]:
    """The lowest threshold keeping table + monitor within ``budget`` of passed runs (None: none does), and why.

    ``peaks``: each run's highest out-of-fold risk on a turn where the monitor may act. The budget holds pooled and
    for every agent model with at least ``MODEL_MIN_PASSED`` passed runs (or that model's table share, if higher):
    one agent's good runs do not pay for another's."""
    passed = [(r, p) for r, p in zip(runs, peaks, strict=True) if not r.failed]
    pooled_limit = math.floor(budget * len(passed) + 1e-9)
    flagged = Counter(r.model for r, _ in passed if r.table)
    if sum(flagged.values()) > pooled_limit:
        return None, f"the table alone acts on {sum(flagged.values())} of {len(passed)} passed runs"
    sizes = Counter(r.model for r, _ in passed)
    limits = {m: max(math.floor(budget * n + 1e-9), flagged[m]) for m, n in sizes.items() if n >= MODEL_MIN_PASSED}
    free = sorted(((p, r.model) for r, p in passed if not r.table and p is not None), reverse=True)
    if not free:
        return 0.5, "no passed run had a turn to act on"
    total = sum(flagged.values())
    stop = len(free)
    for k, (_, model) in enumerate(free):
        total += 1
        flagged[model] += 1
        if total > pooled_limit or flagged[model] > limits.get(model, len(passed)):
            stop = k
            break
    if stop == len(free):
        return round(free[-1][0], 4), "every passed run fits the budget"
    above = free[stop][0]
    while stop > 0 and free[stop - 1][0] == above:  # ties cannot be told apart: none of them is flagged
        stop -= 1
    below = free[stop - 1][0] if stop > 0 else min(1.0, above + 0.05)
    return round((above + below) / 2, 4), "within budget"


def robust_threshold(
    runs: Sequence[_Run], scorings: Sequence[Sequence[float | None]], budget: float
) -> tuple[float | None, str]:
    """The threshold that keeps the budget under every scoring of the runs (``scorings``: each run's peak risk, one
    list per fit): the highest of each scoring's lowest threshold (None: one of them has none), and why."""
    chosen = [choose_threshold(runs, peaks, budget) for peaks in scorings]
    for threshold, reason in chosen:
        if threshold is None:
            return None, reason
    return max((t for t, _ in chosen if t is not None), default=None), chosen[0][1]


def _wilson(hits: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest  # training only, like scikit-learn (which needs it)

    ci = binomtest(hits, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def proven(added_failed: int, failed: int, added_passed: int, passed: int) -> bool:
    """Whether the flags the monitor adds prove it: at least ``MIN_GAIN`` failed runs, and the lower bound of the
    share of failed runs added at least ``MIN_LIFT`` times the upper bound of the share of passed runs added."""
    if added_failed < MIN_GAIN or failed == 0 or passed == 0:
        return False
    return _wilson(added_failed, failed)[0] >= MIN_LIFT * _wilson(added_passed, passed)[1]


def figures(runs: Sequence[_Run], peaks: Sequence[float | None], threshold: float | None) -> dict[str, float]:
    def share(failed: bool, monitor: bool) -> float:
        chosen = [r for r in runs if r.failed == failed]
        hit = sum(
            r.table or (monitor and threshold is not None and p is not None and p >= threshold)
            for r, p in zip(runs, peaks, strict=True)
            if r.failed == failed
        )
        return round(hit / len(chosen), 3) if chosen else 0.0

    return {
        "table_failed_flagged": share(True, False),
        "table_passed_flagged": share(False, False),
        "monitor_failed_flagged": share(True, True),
        "monitor_passed_flagged": share(False, True),
    }


def collect(profile: Profile, trajectories: Sequence[Trajectory], tools: list[dict[str, Any]]) -> list[_Run]:
    engine = Engine(profile.model_copy(update={"monitor": None}))
    labelled = [t for t in trajectories if t.reward is not None]
    return [
        _Run(
            r,
            (r.trajectory.reward or 0.0) < 1.0,
            group_of(r.trajectory),
            any(f.action in ACTING for f in r.flags),
            str(r.trajectory.extra.get("agent_model", "?")),
        )
        for r in replay(engine, labelled, tools, collect=True)
    ]


def train_monitor(
    profile: Profile,
    trajectories: Sequence[Trajectory],
    tools: list[dict[str, Any]],
    *,
    budget: float | None = None,
    folds: int = FOLDS,
    min_turns: int = MIN_TURNS,
) -> MonitorConfig:
    """The monitor for ``profile``'s table, trained on ``trajectories``; on only where cross-validation proves it."""
    budget = budget if budget is not None else (profile.monitor.budget if profile.monitor else 0.08)
    runs = collect(profile, trajectories, tools)
    print_fp = fingerprint((r.replayed.trajectory.id, r.replayed.trajectory.reward) for r in runs)
    off = MonitorConfig(budget=budget, feature_version=FEATURE_VERSION, features=list(FEATURES), fingerprint=print_fp)
    failed = sum(r.failed for r in runs)
    if failed < MIN_GAIN or len(runs) - failed < MIN_PASSED or len({r.group for r in runs}) < 2:
        why = f"off: too few runs to learn from ({failed} failed, {len(runs) - failed} passed; {MIN_PASSED} passed needed)"
        return off.model_copy(update={"why": why})
    risks, fold_models = out_of_fold(runs, folds, min_turns)
    peaks = [_peak(rs) for rs in risks]
    model = _train(runs, min_turns)
    scorings = [peaks] + [[_peak(_risks(m, r)) for r in runs] for m in [*fold_models, model] if m is not None]
    threshold, reason = robust_threshold(runs, scorings, budget)
    shares = figures(runs, peaks, threshold)
    cv = MonitorFigures(
        folds=len(_folds(runs, folds)),
        groups=len({r.group for r in runs}),
        failed=failed,
        passed=len(runs) - failed,
        auprc=_auprc(runs, risks),
        **shares,
    )
    if model is None:
        return off.model_copy(update={"why": "one outcome only", "cv": cv})

    def added(outcome: bool) -> int:
        return sum(
            not r.table and threshold is not None and p is not None and p >= threshold
            for r, p in zip(runs, peaks, strict=True)
            if r.failed == outcome
        )

    gain, passed = added(True), len(runs) - failed
    enabled = threshold is not None and proven(gain, failed, added(False), passed)
    if threshold is None:
        why = f"off: {reason}, over the budget of {budget:.0%}"
    elif not enabled:
        why = (
            f"off: within the budget of {budget:.0%} it caught {gain} more of {failed} failed runs for {added(False)}"
            f" more of {passed} passed runs in cross-validation: not proven (at least {MIN_GAIN}, and {MIN_LIFT:g}x"
            " the share of passed runs, each on its pessimistic bound)"
        )
    else:
        why = f"on: {gain} more failed runs caught in cross-validation within the budget of {budget:.0%}"
    return model.model_copy(
        update={
            "enabled": enabled,
            "why": why,
            "budget": budget,
            "threshold": threshold if threshold is not None else 1.0,
            "fingerprint": print_fp,
            "cv": cv,
        }
    )


__all__ = [
    "FOLDS",
    "MIN_GAIN",
    "MIN_TURNS",
    "choose_threshold",
    "group_of",
    "out_of_fold",
    "proven",
    "robust_threshold",
    "train_monitor",
]
