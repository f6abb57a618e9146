from __future__ import annotations

from pathlib import Path

import pytest

from detector_service.engine import Engine
from detector_service.wire import Category, TurnEvent
from tests.tau_turns import QWEN, V1, turn

pytestmark = pytest.mark.tau


def loop(event: TurnEvent) -> list[str]:
    return [f.detector for f in Engine().evaluate(event).findings if f.category is Category.LOOP]


def test_repeated_tool_errors(tau_dir: Path) -> None:
    # qwen calls the tool again after two failed calls in a row.
    assert loop(turn(tau_dir, QWEN, "15#0", 25)) == ["repeated_errors"]


def test_same_call_repeated(tau_dir: Path) -> None:
    assert "repeated_call" in loop(turn(tau_dir, V1, "8#1", 38))


def test_repeat_the_user_asked_for_passes(tau_dir: Path) -> None:
    # The user asked to search again; the same search after a new user message is not a loop.
    assert loop(turn(tau_dir, QWEN, "10#0", 42)) == []


def test_first_call_passes(tau_dir: Path) -> None:
    assert loop(turn(tau_dir, V1, "0#0", 6)) == []
