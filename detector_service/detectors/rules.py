"""The profile's declarative policy rules (DESIGN §7), checked against each call of the turn."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from detector_service.contract.profile import (
    ArgumentConstraint,
    EntityCondition,
    FieldCondition,
    Forbidden,
    RequiresConfirmation,
    RequiresPriorRead,
    ToolKind,
)
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.detectors import call_finding
from detector_service.detectors.dcv import unconfirmed, unlisted
from detector_service.turn import Call, TurnView, leaves, norm


@lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _finding(call: Call, detector: str, message: str, **evidence: Any) -> Finding:
    return call_finding(Category.DCV, call, detector, message, Severity.ERROR, evidence)


def _values(call: Call, argument: str) -> list[Any]:
    return [v for k, v in leaves(call.args or {}) if k == argument]


def _read_tools(view: TurnView) -> list[tuple[str, ToolKind]]:
    kinds = view.index.kinds
    return [(name, kinds.kind(name)) for name in view.index.values_by_tool if kinds.kind(name) is ToolKind.READ]


def _prior_read(view: TurnView, rule: RequiresPriorRead, call: Call) -> Finding | None:
    wanted = {norm(v) for v in _values(call, rule.argument)}
    if not wanted:
        return None
    # A read "of the same id" either looked the value up or returned it.
    names = rule.read_tools or [n for n, k in _read_tools(view)]
    if any(wanted <= view.index.values_by_tool.get(name, set()) for name in names):
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


def _field(obj: Any, path: str) -> list[Any]:
    values = [obj]
    for part in path.split("."):
        nxt: list[Any] = []
        for v in values:
            items = v if isinstance(v, list) else [v]
            nxt.extend(item[part] for item in items if isinstance(item, dict) and part in item)
        values = nxt
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def _time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace(" EST", "").strip())
    except ValueError:
        return None


def _holds(cond: FieldCondition, entity: dict[str, Any], now: datetime | None) -> bool:
    values = _field(entity, cond.field)
    if cond.equals is not None and norm(cond.equals) in {norm(v) for v in values}:
        return True
    if cond.one_of is not None and {norm(v) for v in values} & {norm(v) for v in cond.one_of}:
        return True
    if cond.any_item_equals is not None and norm(cond.any_item_equals) in {norm(v) for v in values}:
        return True
    if cond.within_hours is not None and now is not None:
        for v in values:
            when = _time(v)
            if when is not None and timedelta(0) <= now - when <= timedelta(hours=cond.within_hours):
                return True
    return False


def _describe(cond: FieldCondition) -> str:
    if cond.within_hours is not None:
        return f"{cond.field} within {cond.within_hours:g} hours"
    if cond.one_of is not None:
        return f"{cond.field} in {cond.one_of}"
    return f"{cond.field} = {cond.equals if cond.equals is not None else cond.any_item_equals!r}"


def _entity_condition(view: TurnView, rule: EntityCondition, call: Call) -> Finding | None:
    for value in _values(call, rule.argument):
        found = view.index.entities.get((rule.argument, norm(value)))
        if not found:
            continue  # never read: the write-on-unread-entity check speaks for this case
        # The latest full record wins: a write's output shows the entity as it is now.
        widest = max(len(o) for o in found)
        entity = next(o for o in reversed(found) if len(o) * 2 >= widest)
        if not any(_field(entity, c.field) for c in rule.any_of):
            continue  # a record without the fields the rule reads cannot show a violation
        now = _time(rule.now) if rule.now else None
        if any(_holds(c, entity, now) for c in rule.any_of):
            continue
        needs = " or ".join(_describe(c) for c in rule.any_of)
        why = f" ({rule.message})" if rule.message else ""
        return _finding(
            call,
            "entity_condition",
            f"Rule: '{call.name}' is allowed only when {needs}{why}. The {rule.argument} {value!r} that the tools "
            "returned meets none of these; do not call it, explain the policy to the user instead.",
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
                found = unconfirmed(view, call, "requires_confirmation") or unlisted(view, call)
            elif isinstance(rule, RequiresPriorRead):
                found = _prior_read(view, rule, call)
            elif isinstance(rule, ArgumentConstraint):
                found = _constraint(rule, call)
            elif isinstance(rule, EntityCondition):
                found = _entity_condition(view, rule, call)
            elif isinstance(rule, Forbidden):
                why = f" ({rule.message})" if rule.message else ""
                found = _finding(call, "forbidden", f"Rule: '{call.name}' must not be called{why}.")
            if found is not None:
                out.append(found)
    return out
