"""The accounting of ``fama eval tau2`` on hand-made outcomes: pass^k, rescued and broken per trial pair, r, d, p,
the decision rule p > d/(r+d) and its interval (no tau2 needed)."""

from __future__ import annotations

import math

from proxy.eval_tau2.accounting import Outcome, compare, pass_hat_k


def _runs(arm: str, task: str, results: str) -> list[Outcome]:
    return [Outcome(arm, task, trial, ok == "P") for trial, ok in enumerate(results)]


def test_pass_hat_k_is_the_chance_that_k_trials_of_a_task_all_pass() -> None:
    outcomes = _runs("direct", "a", "PPF") + _runs("direct", "b", "PPP")
    got = pass_hat_k(outcomes)
    assert got == {1: (2 / 3 + 1) / 2, 2: (1 / 3 + 1) / 2, 3: (0 + 1) / 2}
    # K is the fewest trials any task has.
    assert set(pass_hat_k([*outcomes, *_runs("direct", "c", "P")])) == {1}


def test_rescued_and_broken_are_counted_per_trial_pair() -> None:
    outcomes = [
        *_runs("direct", "a", "FFPP"),
        *_runs("enforce", "a", "PFPF"),  # trial 0 rescued, trial 3 broken
        *_runs("direct", "b", "PPPP"),
        *_runs("enforce", "b", "PPPP"),
        *_runs("direct", "c", "FFFF"),
        *_runs("enforce", "c", "PPFP"),  # three rescued
    ]
    c = compare(outcomes, "enforce")
    assert {t.task_id: (t.pairs, t.rescued, t.broken) for t in c.tasks} == {
        "a": (4, 1, 1),
        "b": (4, 0, 0),
        "c": (4, 3, 0),
    }
    assert (c.pairs, c.direct_failures, c.rescued, c.broken) == (12, 6, 4, 1)
    assert c.p == 0.5
    assert c.r == 4 / 6
    assert c.d == 1 / 6
    assert c.threshold is not None
    assert math.isclose(c.threshold, (1 / 6) / (4 / 6 + 1 / 6))
    # The net gain is p·r − (1 − p)·d, and the rule holds exactly when it is positive.
    assert c.net_gain is not None
    assert math.isclose(c.net_gain, c.p * c.r - (1 - c.p) * c.d)
    assert c.record()["rule_p_gt_threshold"] is True


def test_an_arm_that_breaks_more_than_it_rescues_does_not_pay_off() -> None:
    outcomes = []
    for task in "abcdefgh":
        outcomes += _runs("direct", task, "PPP")
        outcomes += _runs("enforce", task, "FPP")  # one broken pass in three, everywhere
    c = compare(outcomes, "enforce")
    assert (c.rescued, c.broken, c.r, c.threshold) == (0, 8, None, 1.0)
    assert c.interval is not None
    assert c.interval[1] < 0
    assert c.verdict.startswith("enforce does not pay off")


def test_the_verdict_needs_an_interval_clear_of_zero() -> None:
    pays = []
    for task in "abcdefghij":
        pays += _runs("direct", task, "FF")
        pays += _runs("enforce", task, "PF")
    assert compare(pays, "enforce").verdict.startswith("enforce pays off")
    # One task that gains and one that does not: the point estimate favours enforce, the interval does not.
    mixed = (
        _runs("direct", "a", "F") + _runs("enforce", "a", "P") + _runs("direct", "b", "P") + _runs("enforce", "b", "P")
    )
    c = compare(mixed, "enforce")
    assert c.interval == (0.0, 1.0)
    assert c.verdict.startswith("inconclusive: p > d/(r+d)")
    same = _runs("direct", "a", "PF") + _runs("enforce", "a", "PF")
    assert compare(same, "enforce").verdict == "no difference: nothing rescued, nothing broken"


def test_only_trials_both_arms_ran_are_paired() -> None:
    outcomes = _runs("direct", "a", "FF") + _runs("enforce", "a", "P") + _runs("observe", "a", "PP")
    assert compare(outcomes, "enforce").pairs == 1
    assert compare(outcomes, "observe").rescued == 2
    assert compare(outcomes, "nothing").pairs == 0
