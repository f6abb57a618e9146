"""The done-when numbers on the dev corpus, per file and per category, with and without the airline profile.

Floors sit a little under the measured values so that a regression fails the test; the printed table
is the report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detector_service.engine import Engine
from detector_service.evaluation import first_deviating_write, ground_truth_keys, score
from detector_service.profile import Profile, load_profile
from detector_service.replay import replay
from detector_service.toolkinds import ToolKinds
from detector_service.trajectories import load
from tests.tau_turns import QWEN, V1, tools, trajectory

pytestmark = pytest.mark.tau
AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"

# file, profile -> (failed flagged >=, passed flagged <=, failed flagged early >=)
FLOORS = {
    (V1, None): (0.46, 0.06, 0.35),
    (QWEN, None): (0.62, 0.17, 0.54),
    (V1, "airline"): (0.52, 0.10, 0.41),
    (QWEN, "airline"): (0.79, 0.17, 0.79),
}


@pytest.mark.parametrize(("file", "profile_name"), list(FLOORS))
def test_done_when_numbers(tau_dir: Path, file: str, profile_name: str | None) -> None:
    profile = load_profile(AIRLINE) if profile_name else Profile()
    schema = tools(tau_dir, file)
    results = replay(Engine(profile), load(tau_dir / "trajectories" / file), schema)
    s = score(results, ToolKinds(profile, schema))
    rates = s.rates()
    print(f"\n{file} profile={profile_name}: {s.failed} failed, {s.passed} passed, {rates}")
    for category, row in sorted(s.by_category.items()):
        print(f"  {category}: {row}")
    flagged_min, passed_max, early_min = FLOORS[(file, profile_name)]
    assert rates["failed_flagged"] >= flagged_min
    assert rates["passed_flagged"] <= passed_max
    assert rates["failed_early"] >= early_min
    assert sum(row["failed"] for row in s.by_category.values()) >= s.failed_flagged


def test_first_deviating_write(tau_dir: Path) -> None:
    # 31#1 cancels D1EW9B where the ground truth cancels 9HBUV8.
    t = trajectory(tau_dir, V1, "31#1")
    kinds = ToolKinds(Profile(), tools(tau_dir, V1))
    index = first_deviating_write(t.messages, kinds, ground_truth_keys(t.extra["ground_truth"]))
    assert index is not None
    assert "D1EW9B" in t.messages[index]["tool_calls"][0]["function"]["arguments"]
    # 0#0 of the qwen run passed; its writes, if any, are all in the ground truth.
    passed = next(t for t in load(tau_dir / "trajectories" / QWEN) if t.reward == 1.0)
    kinds2 = ToolKinds(Profile(), tools(tau_dir, QWEN))
    assert first_deviating_write(passed.messages, kinds2, ground_truth_keys(passed.extra["ground_truth"])) is None


def test_passed_runs_flagged_on_rejected_writes_outside_the_truth(tau_dir: Path) -> None:
    # qwen's task 10 passed with a ground truth of no action: its three bookings (flagged for booking before
    # the user's yes) were all rejected by the tool, so the reward never saw them.
    schema = tools(tau_dir, QWEN)
    run = trajectory(tau_dir, QWEN, "10#0")
    assert run.reward == 1.0
    s = score(replay(Engine(Profile()), [run], schema), ToolKinds(Profile(), schema))
    assert (s.passed, s.passed_flagged) == (1, 1)
    assert s.passed_flagged_on_deviating_writes == 1
    assert s.passed_flagged_no_write_in_truth == 1


def test_passed_run_flagged_on_a_write_in_the_truth_is_not_set_apart(tau_dir: Path) -> None:
    # gpt-4o's 45#0 sends the certificate the ground truth asks for, without listing it first: the flag sits on
    # a write the truth contains, so it stays an unexplained flag on a passed run.
    schema = tools(tau_dir, V1)
    run = trajectory(tau_dir, V1, "45#0")
    s = score(replay(Engine(Profile()), [run], schema), ToolKinds(Profile(), schema))
    assert (s.passed, s.passed_flagged) == (1, 1)
    assert s.passed_flagged_on_deviating_writes == 0
    assert s.passed_flagged_no_write_in_truth == 0
