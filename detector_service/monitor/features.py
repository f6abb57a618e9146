"""The monitor's features (version ``FEATURE_VERSION``): what a turn's prefix says about how the run will end.

``FeatureState`` is fed a conversation one message at a time, in step with the turn's ``ConversationIndex``, and
keeps counters only, so a session's next turn costs the new messages, never a re-scan of the prefix. ``vector``
reads the state, the index's value sets and the candidate's calls. Nothing here knows a benchmark: the features
are about go-aheads, hand-offs, tool errors, pending writes, run length and where a write's values come from.
Changing any feature's meaning means a new ``FEATURE_VERSION``: a monitor trained on another version abstains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from detector_service.confirmation import says_yes
from detector_service.contract.profile import ToolKind
from detector_service.contract.toolkinds import ToolKinds, is_handoff
from detector_service.turn import Call, ConversationIndex, UserDeviceCalls, is_error_output, leaves, norm, text_of
from detector_service.turn import tool_calls_of as _calls

FEATURE_VERSION = "1"
FEATURES: tuple[str, ...] = (
    "user_yes",  # the latest user message gives a go-ahead
    "pending_write",  # the candidate calls a write tool
    "pending_handoff",  # the candidate hands the user off
    "pending_text",  # the candidate calls nothing
    "tool_error_rate",  # tool outputs so far that were errors
    "errors_in_row",  # errors since the latest success or user message (capped at 3, scaled to 1)
    "run_length",  # log(1 + messages so far)
    "user_turns",  # log(1 + user messages)
    "writes_so_far",  # log(1 + write calls so far)
    "calls_since_user",  # log(1 + calls since the latest user message)
    "write_value_told_only",  # a write argument that only an earlier assistant message holds
    "write_value_unseen",  # a write argument nobody said and no tool returned
)


class FeatureState:
    """Counters over the conversation so far (the agent's view: dual-control traffic is left out)."""

    __slots__ = (
        "_device",
        "calls_since_user",
        "errors",
        "errors_in_row",
        "kinds",
        "messages",
        "outputs",
        "user_turns",
        "user_yes",
        "writes",
    )

    def __init__(self, kinds: ToolKinds) -> None:
        self.kinds = kinds
        self._device = UserDeviceCalls()
        self.messages = 0
        self.user_turns = 0
        self.user_yes = False
        self.outputs = 0
        self.errors = 0
        self.errors_in_row = 0
        self.writes = 0
        self.calls_since_user = 0

    @classmethod
    def build(cls, messages: Sequence[Mapping[str, Any]], kinds: ToolKinds) -> FeatureState:
        state = cls(kinds)
        for m in messages:
            state.add(m)
        return state

    def add(self, message: Mapping[str, Any]) -> None:
        if self._device.hides(message):
            return
        self.messages += 1
        role = message.get("role")
        if role == "user":
            self.user_turns += 1
            self.user_yes = says_yes(text_of(message.get("content")))
            self.calls_since_user = 0
            self.errors_in_row = 0
        elif role == "assistant":
            for raw in _calls(message):
                self.calls_since_user += 1
                fn = raw.get("function")
                if isinstance(fn, Mapping) and self.kinds.kind(str(fn.get("name") or "")) is ToolKind.WRITE:
                    self.writes += 1
        elif role in ("tool", "function"):
            self.outputs += 1
            if is_error_output(message):
                self.errors += 1
                self.errors_in_row += 1
            else:
                self.errors_in_row = 0


def _write_values(calls: Sequence[Call]) -> list[Any]:
    return [
        v
        for c in calls
        if c.kind is ToolKind.WRITE and c.args
        for _, v in leaves(c.args)
        if not isinstance(v, bool) and len(norm(v)) > 1
    ]


def vector(state: FeatureState, index: ConversationIndex, calls: Sequence[Call]) -> list[float]:
    """The features of a candidate turn making ``calls``, in ``FEATURES`` order."""
    told_only = unseen = False
    for value in _write_values(calls):
        if index.grounded(value):
            continue
        if norm(value) in index.told_values:
            told_only = True
        else:
            unseen = True
    return [
        float(state.user_yes),
        float(any(c.kind is ToolKind.WRITE for c in calls)),
        float(any(is_handoff(c.name) for c in calls)),
        float(not calls),
        state.errors / state.outputs if state.outputs else 0.0,
        min(state.errors_in_row, 3) / 3,
        math.log1p(state.messages),
        math.log1p(state.user_turns),
        math.log1p(state.writes),
        math.log1p(state.calls_since_user),
        float(told_only),
        float(unseen),
    ]


def dialect_of(index: ConversationIndex) -> str:
    """How the conversation's harness writes its actions, as the monitor counts its training turns."""
    return "react" if index.text_actions else "native"


__all__ = ["FEATURES", "FEATURE_VERSION", "FeatureState", "dialect_of", "vector"]
