from __future__ import annotations

from pathlib import Path

import pytest

from detector_service.contract.profile import ProfileError, RequiresConfirmation, dump_profile, load_profile
from detector_service.contract.wire import (
    Action,
    Category,
    Finding,
    SchemaVersionError,
    TurnEvent,
    Verdict,
    check_version,
)


def test_turn_event_round_trips_through_json() -> None:
    turn = TurnEvent(
        session_id="s1",
        tenant="acme",
        messages=[{"role": "user", "content": "cancel it"}],
        candidate={"role": "assistant", "content": None, "tool_calls": []},
    )
    back = TurnEvent.model_validate_json(turn.model_dump_json())
    assert back == turn
    assert back.v == 1
    assert back.turn_id.startswith("turn-")


def test_verdict_lists_distinct_categories() -> None:
    verdict = Verdict(
        turn_id="t",
        session_id="s",
        action=Action.RETRY,
        findings=[
            Finding(category=Category.DCV, detector="a", message="m"),
            Finding(category=Category.MTC, detector="b", message="m"),
            Finding(category=Category.DCV, detector="c", message="m"),
        ],
    )
    assert verdict.categories == [Category.DCV, Category.MTC]


def test_future_schema_version_is_refused() -> None:
    with pytest.raises(SchemaVersionError):
        check_version({"v": 99})
    check_version({"v": 1})


def test_profile_round_trip_and_unknown_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nmode: enforce\nrules:\n  - {type: requires_confirmation, tool: cancel_reservation}\n")
    profile = load_profile(path)
    assert profile.mode == "enforce"
    assert profile.rules == [RequiresConfirmation(tool="cancel_reservation")]
    path.write_text(dump_profile(profile))
    assert load_profile(path) == profile
    path.write_text("version: 1\nagentz: [TOR]\n")
    with pytest.raises(ProfileError, match="agentz"):
        load_profile(path)
