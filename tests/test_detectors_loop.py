from __future__ import annotations

from pathlib import Path

import pytest

from detector_service.contract.wire import Category, TurnEvent
from detector_service.engine import Engine
from tests.tau_turns import QWEN, V1, turn

pytestmark = pytest.mark.tau


def loop(event: TurnEvent) -> list[str]:
    return [f.detector for f in Engine().evaluate(event).findings if f.category is Category.LOOP]


def test_retrying_arguments_that_already_failed(tau_dir: Path) -> None:
    # qwen books again with exactly the arguments that failed at message 25 ("payment method not found").
    assert loop(turn(tau_dir, QWEN, "15#0", 29)) == ["repeated_errors"]


def test_retry_after_the_user_chose_something_new_passes(tau_dir: Path) -> None:
    # Two bookings failed, but the user then agreed to another flight: the third attempt is not blind.
    assert loop(turn(tau_dir, QWEN, "15#0", 25)) == []


def test_errors_in_a_row_without_a_user_message(tau_dir: Path) -> None:
    # gpt-4o's update failed twice in a row (gift card balance, certificate) and it calls the tool again at once.
    event = turn(tau_dir, V1, "23#1", 34)
    assert event.messages[-1]["content"].startswith("Error")
    extra = [
        *event.messages,
        event.candidate,
        {"role": "tool", "tool_call_id": event.candidate["tool_calls"][0]["id"], "content": "Error: seat map changed"},
    ]
    again = TurnEvent(
        session_id="again", messages=extra, tools=event.tools, candidate=turn(tau_dir, V1, "23#1", 38).candidate
    )
    assert loop(again) == ["repeated_errors"]


def test_same_call_repeated(tau_dir: Path) -> None:
    assert "repeated_call" in loop(turn(tau_dir, V1, "8#1", 38))


def test_repeat_the_user_asked_for_passes(tau_dir: Path) -> None:
    # The user asked to search again; the same search after a new user message is not a loop.
    assert loop(turn(tau_dir, QWEN, "10#0", 42)) == []


def test_first_call_passes(tau_dir: Path) -> None:
    assert loop(turn(tau_dir, V1, "0#0", 6)) == []
