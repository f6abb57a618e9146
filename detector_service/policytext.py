"""Rules read deterministically from a policy's own words (the system message of recorded runs).

Only sentences whose meaning is unambiguous become rules: "explicit user confirmation before actions
that update the database" makes every write tool ``requires_confirmation``; "one tool call at a time"
makes ``one_tool_call_per_turn`` (with no text alongside a call when the policy says so). Anything
subtler is left to a human editing the written profile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from detector_service.contract.profile import OneToolCallPerTurn, RequiresConfirmation, Rule

_CONFIRM = re.compile(
    r"(explicit|obtain|get|ask for)\W+(?:\w+\W+){0,4}(user\W+)?confirmation|confirm with the user", re.IGNORECASE
)
_WRITE_SCOPE = re.compile(r"updat|modif|chang|book|cancel|writ|database|action", re.IGNORECASE)
_ONE_CALL = re.compile(r"one tool call at a time|one (function|tool) call per (turn|message)", re.IGNORECASE)
_NO_TEXT = re.compile(
    r"(not|never) respond to the user (simultaneously|at the same time)|not make a tool call at the same time",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?\n])\s+")


def sentences(policy: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(policy) if s.strip()]


@lru_cache(maxsize=256)
def demands_confirmation(policy: str) -> bool:
    """Whether the policy asks for explicit user confirmation before changing data. Cached per policy text."""
    return any(_CONFIRM.search(s) and _WRITE_SCOPE.search(s) for s in sentences(policy))


@lru_cache(maxsize=256)
def one_call_rule(policy: str) -> OneToolCallPerTurn | None:
    """The policy's "one tool call at a time" as a rule, or None. Cached per policy text."""
    if any(_ONE_CALL.search(s) for s in sentences(policy)):
        return OneToolCallPerTurn(no_text_with_tool_call=bool(_NO_TEXT.search(policy)))
    return None


def extract_rules(policy: str, write_tools: Iterable[str]) -> list[Rule]:
    rules: list[Rule] = []
    if demands_confirmation(policy):
        rules.extend(RequiresConfirmation(tool=name) for name in sorted(write_tools))
    one_call = one_call_rule(policy)
    if one_call is not None:
        rules.append(one_call)
    return rules
