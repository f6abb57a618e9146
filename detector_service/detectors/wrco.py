"""WRCO, wrong retrieval from complex tool outputs.

- ungrounded value: an id-like or amount-like argument value that no earlier tool output and no user
  message contains (the model made it up or misread it);
- write on an entity never read: a write whose id-like arguments were never looked up or returned by a
  read tool;
- contradiction: a call pairs an entity id with the id of its owner (user, customer, account) that differs
  from what a tool returned for that entity (e.g. a reservation passed with a user id that the reservation
  does not have). Other id-valued attributes are often what the call changes or chooses (a new plan, the
  payment method for a difference), so a different value there is no contradiction.
"""

from __future__ import annotations

import re

from detector_service.contract.profile import ToolKind
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.detectors import call_finding
from detector_service.turn import Call, TurnView, is_amount_key, is_id_key, is_id_value, leaves, norm


def _salient(key: str, value: object) -> str | None:
    """'id' or 'amount' when the value is the kind the model must copy, not invent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and (is_id_value(value) or (is_id_key(key) and len(value) >= 3)):
        return "id"
    if isinstance(value, int | float) and is_amount_key(key) and value != 0:
        return "amount"
    return None


def _finding(call: Call, detector: str, message: str, severity: Severity, **evidence: object) -> Finding:
    return call_finding(Category.WRCO, call, detector, message, severity, evidence)


def detect(view: TurnView) -> list[Finding]:
    index = view.index
    settings = view.profile.detector_settings("wrco")
    check_amounts = bool(settings.get("amounts", False))
    out: list[Finding] = []
    for call in view.calls:
        # Reads with a wrong value fail harmlessly and show the model its mistake; writes change data.
        if not call.args or call.kind is not ToolKind.WRITE:
            continue
        missing: list[str] = []
        unread: list[str] = []
        for key, value in leaves(call.args):
            kind = _salient(key, value)
            if kind is None or (kind == "amount" and not check_amounts):
                continue
            if not index.grounded(value):
                missing.append(f"{key}={value!r}")
            elif kind == "id" and call.kind is ToolKind.WRITE and norm(value) not in index.read_values:
                unread.append(f"{key}={value!r}")
        if missing:
            out.append(
                _finding(
                    call,
                    "ungrounded_value",
                    f"Rule: copy ids and amounts from tool outputs or the user's words. In '{call.name}', "
                    f"{', '.join(missing)} appears in no earlier tool output or user message. Look the value up "
                    "with a read tool or ask the user.",
                    Severity.ERROR,
                    values=missing,
                )
            )
        elif unread and bool(settings.get("write_requires_read", True)):
            out.append(
                _finding(
                    call,
                    "write_on_unread_entity",
                    f"Rule: read an entity before changing it. '{call.name}' writes {', '.join(unread)}, which no "
                    "read tool has looked up or returned in this conversation. Read it first and check it.",
                    Severity.WARNING,
                    values=unread,
                )
            )
        out.extend(_contradictions(view, call))
    return out


_OWNER_KEY = re.compile(r"(^|_)(user|customer|account|owner|client|member)_?id$", re.IGNORECASE)


def _contradictions(view: TurnView, call: Call) -> list[Finding]:
    args = call.args or {}
    scalars = {k: v for k, v in args.items() if isinstance(v, str | int) and not isinstance(v, bool)}
    out: list[Finding] = []
    for key, value in scalars.items():
        if not is_id_key(key):
            continue
        for obj in view.index.entities.get((key, norm(value)), ())[:3]:
            for other, given in scalars.items():
                if other == key or not _OWNER_KEY.search(other) or other not in obj:
                    continue
                recorded = obj[other]
                if isinstance(recorded, str | int) and norm(recorded) != norm(given):
                    out.append(
                        _finding(
                            call,
                            "contradicts_tool_output",
                            f"Rule: use the values tools returned. '{call.name}' passes {key}={value!r} with "
                            f"{other}={given!r}, but a tool returned {other}={recorded!r} for that {key}.",
                            Severity.ERROR,
                            key=key,
                            other=other,
                            given=given,
                            recorded=recorded,
                        )
                    )
                    return out
    return out
