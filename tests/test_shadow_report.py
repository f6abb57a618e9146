"""From observe to enforce on recorded traffic: ``fama report`` (the shadow report) and ``fama analyze`` on sessions
that an observe-mode proxy recorded in a real redis-server and ``fama sessions export`` wrote out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector_service.contract.profile import Mode, load_profile
from detector_service.contract.wire import Action, Category
from tests.recorded_sessions import FAILED, FALSE_ALARMS, GOOD, TENANT, record_outcomes, running
from tests.servers import run_fama

pytestmark = pytest.mark.redis


@pytest.fixture
def exported(redis_url: str, tmp_path: Path) -> Path:
    """Sessions an observe-mode proxy recorded: unconfirmed cancellations that failed, two that went well anyway,
    and greetings that went well; exported with the CLI."""
    with running(tmp_path, Mode.OBSERVE, redis_url) as proxy:
        record_outcomes(proxy)
    out = tmp_path / "sessions.jsonl"
    done = run_fama("sessions", "export", "--redis-url", redis_url, "--with-outcome-only", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def _report(exported: Path, tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    done = run_fama("report", str(exported), "--json", str(out), *flags)
    assert done.returncode == 0, done.stderr
    assert "would act on" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_the_shadow_report_shows_what_enforce_mode_would_act_on(exported: Path, tmp_path: Path) -> None:
    report = _report(exported, tmp_path)
    succeeded = FALSE_ALARMS + GOOD
    assert report["sessions"] == {
        "failed": FAILED,
        "succeeded": succeeded,
        "without_outcome": 0,
        "with_recorded_verdicts": FAILED + succeeded,
        "recorded_profiles": ["default"],
    }
    recorded = report["sources"]["recorded"]
    assert (recorded["failed_acted"], recorded["succeeded_acted"]) == (FAILED, FALSE_ALARMS)
    assert recorded["succeeded_share"] == round(FALSE_ALARMS / succeeded, 3)
    # The examples name the good sessions it would have disturbed.
    false_alarms = {f"{TENANT}/cancel-{n}" for n in range(FAILED, FAILED + FALSE_ALARMS)}
    assert set(recorded["examples"]["succeeded"]) == false_alarms
    assert recorded["by_tool"]["cancel_reservation"]["failed"] == FAILED
    assert recorded["by_tool"]["cancel_reservation"]["succeeded"] == FALSE_ALARMS
    [kind] = [k for k in recorded["by_kind"] if k.startswith("DCV/")]
    assert set(recorded["by_kind"][kind]["examples"]["succeeded"]) == false_alarms
    # Replaying with the profile that was in force (zero-config) finds what observe mode recorded.
    current = report["sources"]["current"]
    assert (current["failed_acted"], current["succeeded_acted"]) == (FAILED, FALSE_ALARMS)
    assert set(current["by_kind"]) == set(recorded["by_kind"])


def test_a_candidate_profile_is_compared_with_the_current_one(exported: Path, tmp_path: Path) -> None:
    current, candidate = tmp_path / "current.yaml", tmp_path / "candidate.yaml"
    current.write_text(yaml.safe_dump({}))
    candidate.write_text(yaml.safe_dump({"actions": {"DCV": "guide"}}))
    report = _report(exported, tmp_path, "--profile", str(current), "--candidate", str(candidate))
    assert report["sources"]["current"]["succeeded_acted"] == FALSE_ALARMS
    assert report["sources"]["candidate"]["failed_acted"] == 0
    assert report["sources"]["candidate"]["succeeded_acted"] == 0


def test_analyze_calibrates_on_exported_sessions_and_the_report_shows_the_result(
    exported: Path, tmp_path: Path
) -> None:
    current, new = tmp_path / "current.yaml", tmp_path / "new.yaml"
    current.write_text(yaml.safe_dump({}))
    done = run_fama("analyze", str(exported), "--profile", str(current), "--out", str(new))
    assert done.returncode == 0, done.stderr
    profile = load_profile(new)
    assert profile.calibration is not None
    assert (profile.calibration.failed, profile.calibration.passed) == (FAILED, FALSE_ALARMS + GOOD)
    # The tools came from the records: the cancellation is a write the profile knows.
    [(key, entry)] = [(k, e) for k, e in profile.findings.items() if k.startswith(f"{Category.DCV.value}/")]
    assert (entry.failed, entry.passed) == (FAILED, FALSE_ALARMS)
    assert entry.action is Action.GUIDE  # fires on 2 of 16 good sessions: too many to act on
    report = _report(exported, tmp_path, "--profile", str(current), "--candidate", str(new))
    assert report["sources"]["candidate"]["succeeded_acted"] == 0
    assert key not in report["sources"]["candidate"]["by_kind"]


def test_analyze_refuses_when_too_few_sessions_carry_outcomes(exported: Path, tmp_path: Path) -> None:
    few = tmp_path / "few.jsonl"
    few.write_text("".join(exported.read_text().splitlines(keepends=True)[:12]))
    done = run_fama("analyze", str(few), "--out", str(tmp_path / "new.yaml"))
    assert done.returncode == 2
    assert "too few runs carry an outcome" in done.stderr
    assert not (tmp_path / "new.yaml").exists()


def test_report_refuses_sessions_without_outcomes(tmp_path: Path) -> None:
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"id": "s", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = run_fama("report", str(bare))
    assert done.returncode == 2
    assert "no session carries an outcome" in done.stderr
