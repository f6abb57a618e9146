"""The profile's declarative policy rules (DESIGN §7), checked against each call of the turn."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from detector_service.detectors.dcv import unconfirmed
from detector_service.profile import ArgumentConstraint, Forbidden, RequiresConfirmation, RequiresPriorRead
from detector_service.turn import Call, TurnView, leaves, norm
from detector_service.wire import Category, Finding, Severity


@lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _finding(call: Call, detector: str, message: str, **evidence: Any) -> Finding:
    return Finding(
        category=Category.DCV,
        detector=detector,
        severity=Severity.ERROR,
        message=message,
        evidence=evidence,
        tool_call_id=call.call_id,
        tool_name=call.name,
    )


def _values(call: Call, argument: str) -> list[Any]:
    return [v for k, v in leaves(call.args or {}) if k == argument]


def _prior_read(view: TurnView, rule: RequiresPriorRead, call: Call) -> Finding | None:
    wanted = {norm(v) for v in _values(call, rule.argument)}
    if not wanted:
        return None
    for earlier in view.index.calls:
        if earlier.result is None or earlier.error:
            continue
        if rule.read_tools and earlier.name not in rule.read_tools:
            continue
        if any(w in earlier.result.lower() for w in wanted):
            return None
    tools = " or ".join(rule.read_tools) if rule.read_tools else "a read tool"
    return _finding(
        call,
        "requires_prior_read",
        f"Rule: '{call.name}' needs a prior read of the same {rule.argument} with {tools}. "
        f"{rule.argument}={', '.join(sorted(wanted))} was never returned by such a call; read it first.",
        argument=rule.argument,
    )


def _constraint(rule: ArgumentConstraint, call: Call) -> Finding | None:
    for value in _values(call, rule.argument):
        problem = None
        if rule.enum is not None and value not in rule.enum:
            problem = f"must be one of {rule.enum}"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if rule.minimum is not None and value < rule.minimum:
                problem = f"must be at least {rule.minimum}"
            elif rule.maximum is not None and value > rule.maximum:
                problem = f"must be at most {rule.maximum}"
        if problem is None and rule.pattern is not None and not _pattern(rule.pattern).search(str(value)):
            problem = f"must match {rule.pattern!r}"
        if problem is not None:
            why = f" ({rule.message})" if rule.message else ""
            return _finding(
                call,
                "argument_constraint",
                f"Rule: in '{call.name}', {rule.argument} {problem}{why}; got {value!r}.",
                argument=rule.argument,
                value=value,
            )
    return None


def detect(view: TurnView) -> list[Finding]:
    out: list[Finding] = []
    for call in view.calls:
        for rule in view.profile.rules:
            found: Finding | None = None
            if getattr(rule, "tool", None) != call.name:
                continue
            if isinstance(rule, RequiresConfirmation):
                found = unconfirmed(view, call, "requires_confirmation")
            elif isinstance(rule, RequiresPriorRead):
                found = _prior_read(view, rule, call)
            elif isinstance(rule, ArgumentConstraint):
                found = _constraint(rule, call)
            elif isinstance(rule, Forbidden):
                why = f" ({rule.message})" if rule.message else ""
                found = _finding(call, "forbidden", f"Rule: '{call.name}' must not be called{why}.")
            if found is not None:
                out.append(found)
    return out
