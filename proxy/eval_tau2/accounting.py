"""What an A/B run of supervision says, from per-episode outcomes alone (no tau2 needed here).

Per arm: pass^k (the chance that all k trials of a task pass, averaged over tasks; Yao et al. 2024). Against the
``direct`` arm, per trial pair (same task, same trial, same seed): **rescued** when direct failed and the arm passed,
**broken** when direct passed and the arm failed. Then ``p`` = direct failure rate, ``r`` = rescued / direct failures,
``d`` = broken / direct passes, and the Intervention Paradox rule (arXiv 2602.03338): supervision pays off when
``p > d / (r + d)``, i.e. when the net gain ``p·r − (1 − p)·d = (rescued − broken) / pairs`` is positive. Its interval
is a bootstrap over tasks (each task keeps its K trial pairs together).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DIRECT = "direct"
SUCCESS_REWARD = 1.0 - 1e-6  # tau2's own threshold: a reward of 1 passes


def passed(reward: float) -> bool:
    return reward >= SUCCESS_REWARD


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished episode, as far as the accounting needs it."""

    arm: str
    task_id: str
    trial: int
    success: bool


def pass_hat_k(outcomes: Iterable[Outcome]) -> dict[int, float]:
    """pass^1..K over tasks, K the fewest trials any task has."""
    per_task: dict[str, list[bool]] = {}
    for o in outcomes:
        per_task.setdefault(o.task_id, []).append(o.success)
    if not per_task:
        return {}
    k_max = min(len(v) for v in per_task.values())
    return {
        k: sum(math.comb(sum(v), k) / math.comb(len(v), k) for v in per_task.values()) / len(per_task)
        for k in range(1, k_max + 1)
    }


@dataclass(slots=True)
class TaskPairs:
    """One task's trial pairs against direct."""

    task_id: str
    pairs: int = 0
    direct_failures: int = 0
    rescued: int = 0
    broken: int = 0


@dataclass(slots=True)
class Comparison:
    """One supervised arm against direct, over the trial pairs both have."""

    arm: str
    tasks: list[TaskPairs] = field(default_factory=list)
    interval: tuple[float, float] | None = None

    @property
    def pairs(self) -> int:
        return sum(t.pairs for t in self.tasks)

    @property
    def direct_failures(self) -> int:
        return sum(t.direct_failures for t in self.tasks)

    @property
    def rescued(self) -> int:
        return sum(t.rescued for t in self.tasks)

    @property
    def broken(self) -> int:
        return sum(t.broken for t in self.tasks)

    @property
    def p(self) -> float | None:
        return self.direct_failures / self.pairs if self.pairs else None

    @property
    def r(self) -> float | None:
        return self.rescued / self.direct_failures if self.direct_failures else None

    @property
    def d(self) -> float | None:
        passes = self.pairs - self.direct_failures
        return self.broken / passes if passes else None

    @property
    def threshold(self) -> float | None:
        """d / (r + d): the baseline failure rate above which intervening pays off."""
        r, d = self.r or 0.0, self.d or 0.0
        return d / (r + d) if r + d > 0 else None

    @property
    def net_gain(self) -> float | None:
        """(rescued − broken) / pairs = p·r − (1 − p)·d, in points of success rate."""
        return (self.rescued - self.broken) / self.pairs if self.pairs else None

    @property
    def verdict(self) -> str:
        if not self.pairs:
            return "no trial pairs yet"
        low, high = self.interval or (self.net_gain or 0.0, self.net_gain or 0.0)
        if self.rescued == self.broken == 0:
            return "no difference: nothing rescued, nothing broken"
        if low > 0:
            return f"{self.arm} pays off on this model and domain (p > d/(r+d))"
        if high < 0:
            return f"{self.arm} does not pay off on this model and domain (p < d/(r+d))"
        rule = "p > d/(r+d)" if (self.net_gain or 0.0) > 0 else "p <= d/(r+d)"
        return f"inconclusive: {rule} on these pairs, but the 95% interval of the net gain includes 0 (more tasks or trials)"

    def record(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "pairs": self.pairs,
            "direct_failures": self.direct_failures,
            "rescued": self.rescued,
            "broken": self.broken,
            "p": self.p,
            "r": self.r,
            "d": self.d,
            "threshold_d_over_r_plus_d": self.threshold,
            "rule_p_gt_threshold": None if self.threshold is None or self.p is None else self.p > self.threshold,
            "net_gain": self.net_gain,
            "net_gain_interval_95": list(self.interval) if self.interval else None,
            "verdict": self.verdict,
            "per_task": [
                {
                    "task_id": t.task_id,
                    "pairs": t.pairs,
                    "direct_failures": t.direct_failures,
                    "rescued": t.rescued,
                    "broken": t.broken,
                }
                for t in self.tasks
            ],
        }


def compare(outcomes: Iterable[Outcome], arm: str, resamples: int = 2000, seed: int = 0) -> Comparison:
    """``arm`` against direct on every (task, trial) both ran."""
    by_key: dict[tuple[str, str, int], bool] = {(o.arm, o.task_id, o.trial): o.success for o in outcomes}
    tasks: dict[str, TaskPairs] = {}
    for (a, task_id, trial), ok_direct in sorted(by_key.items()):
        if a != DIRECT or (arm, task_id, trial) not in by_key:
            continue
        ok_arm = by_key[(arm, task_id, trial)]
        t = tasks.setdefault(task_id, TaskPairs(task_id))
        t.pairs += 1
        t.direct_failures += not ok_direct
        t.rescued += ok_arm and not ok_direct
        t.broken += ok_direct and not ok_arm
    comparison = Comparison(arm, list(tasks.values()))
    comparison.interval = bootstrap_interval(comparison.tasks, resamples, seed)
    return comparison


def bootstrap_interval(tasks: list[TaskPairs], resamples: int, seed: int) -> tuple[float, float] | None:
    """95% percentile interval of the net gain, resampling whole tasks (their K trials stay together)."""
    if not tasks:
        return None
    rng = random.Random(seed)
    gains = []
    for _ in range(resamples):
        drawn = [rng.choice(tasks) for _ in tasks]
        pairs = sum(t.pairs for t in drawn)
        gains.append(sum(t.rescued - t.broken for t in drawn) / pairs)
    gains.sort()
    return gains[int(0.025 * (len(gains) - 1))], gains[math.ceil(0.975 * (len(gains) - 1))]


def outcomes_of(records: Iterable[Mapping[str, Any]]) -> list[Outcome]:
    return [Outcome(str(r["arm"]), str(r["task_id"]), int(r["trial"]), bool(r["success"])) for r in records]
