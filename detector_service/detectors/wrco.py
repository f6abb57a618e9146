"""WRCO, wrong retrieval from complex tool outputs.

- ungrounded value: an id-like or amount-like argument value that no earlier tool output and no user
  message contains (the model made it up or misread it). An id the user or a tool gave in part is grounded
  when the part is its distinctive number and the rest is the form such ids take here: "#W2378156" from
  "order 2378156" where the tool's schema says "such as '#W0000000'" or a tool returned "#W1234567". Not a
  number padded or cut to fit, nor a prefix put on digits of another length ("credit_card_7334" from "the card
  ending in 7334" where the user's cards are "credit_card_9074831"): those ids exist nowhere;
- write on an entity never read: a write whose id-like arguments were never looked up or returned by a
  read tool;
- contradiction: a call pairs an entity id with the id of its owner (user, customer, account) that differs
  from what a tool returned for that entity (e.g. a reservation passed with a user id that the reservation
  does not have). Other id-valued attributes are often what the call changes or chooses (a new plan, the
  payment method for a difference), so a different value there is no contradiction. And a person in a write
  (an object with a first and a last name: a passenger, a traveller) who is a person a tool returned under the
  same names, with another value of an attribute both give (a date of birth): the records of someone other than
  the entity the write changes say otherwise (the user's profile, saved passengers);
- entity named otherwise: the user named what they mean by an identifier (their phone number, an e-mail), the
  tools returned a record that holds it, and the write acts on another record whose same field holds another
  value that the user never said (the first line of the account, not the line with the user's number).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from detector_service.contract.profile import ToolKind
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.detectors import call_finding, schema_of
from detector_service.turn import (
    Call,
    TurnView,
    dicts,
    is_amount_key,
    is_id_key,
    is_id_value,
    leaves,
    norm,
    parse_json,
)


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
            if not index.grounded(value) and not _grounded_in_part(view, call, key, value):
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
        out.extend(_contradictions(view, call) or _person_contradictions(view, call))
        out.extend(_named_otherwise(view, call))
    return out


# An id as a kind prefix and a distinctive number: "#W" + "2378156", "credit_card_" + "9074831".
_PREFIXED_NUMBER = re.compile(r"^(\D*[a-z_\-])(\d{4,})$")
_QUOTED = re.compile(r"'([^'\s]+)'|\"([^\"\s]+)\"")


def _form(value: str) -> tuple[str, int] | None:
    m = _PREFIXED_NUMBER.match(norm(value))
    return (m.group(1), len(m.group(2))) if m else None


def _grounded_in_part(view: TurnView, call: Call, key: str, value: object) -> bool:
    """The id is a kind prefix on a number the user or a tool gave whole, in the form such ids take: the form of
    the examples in the tool's description of the argument, or of an id a tool returned."""
    if not isinstance(value, str):
        return False
    m = _PREFIXED_NUMBER.match(norm(value))
    if m is None:
        return False
    index = view.index
    number = m.group(2)
    if number not in index.user_values and number not in index.tool_values:
        return False
    form = (m.group(1), len(number))
    examples = (a or b for text in _descriptions(view.tools.get(call.name), key) for a, b in _QUOTED.findall(text))
    return any(_form(e) == form for e in examples) or any(_form(v) == form for v in index.tool_values)


def _descriptions(spec: Mapping[str, Any] | None, key: str) -> Iterator[str]:
    """The descriptions of every parameter named ``key`` in a tool's JSON Schema, however deep."""
    if spec is None:
        return
    stack: list[Any] = [schema_of(spec)]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            props = node.get("properties")
            if isinstance(props, Mapping) and isinstance(props.get(key), Mapping):
                yield str(props[key].get("description") or "")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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


def _own_record(obj: Mapping[str, Any], key: str) -> bool:
    """The object is the record of its ``key`` (its first id field), not one that only refers to it."""
    return next((k for k in obj if is_id_key(k)), None) == key


def _named_otherwise(view: TurnView, call: Call) -> list[Finding]:
    """The write's entity holds, in an identifying field, a value the user never said, while the user said
    another value that the tools return in that field for another record: the user named another entity."""
    index = view.index
    args = call.args or {}
    for key, value in args.items():
        if not is_id_key(key) or not isinstance(value, str | int) or isinstance(value, bool):
            continue
        for obj in index.entities.get((key, norm(value)), ())[:3]:
            if not _own_record(obj, key):
                continue
            for field, held in obj.items():
                if field == key or field in args or not is_id_key(field) or not isinstance(held, str | int):
                    continue
                if isinstance(held, bool) or norm(held) in index.user_values:
                    continue
                said = sorted(v for v in index.user_values if v != norm(held) and (field, v) in index.entities)
                if said:
                    return [
                        _finding(
                            call,
                            "entity_named_otherwise",
                            f"Rule: act on the entity the user means. '{call.name}' acts on {key}={value!r}, whose "
                            f"{field} is {held!r}, but the user gave {field} {said[0]!r}, which a tool returned for "
                            f"another record. Check which {key} the user means before changing it.",
                            Severity.WARNING,
                            key=key,
                            field=field,
                            held=held,
                            said=said[0],
                        )
                    ]
    return []


_NAME_KEY = re.compile(r"^(first|last|given|family|middle)_?name$", re.IGNORECASE)


def _person(obj: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """A person's name parts (at least a first and a last name), and the object's other scalar attributes with
    those of a nested name object ({"name": {"first_name": ...}, "dob": ...}) lifted up."""
    flat = {k: v for k, v in obj.items() if isinstance(v, str | int) and not isinstance(v, bool)}
    for v in obj.values():
        if isinstance(v, Mapping):
            flat.update({k: x for k, x in v.items() if _NAME_KEY.match(k) and isinstance(x, str)})
    names = tuple(sorted((k.lower(), norm(v)) for k, v in flat.items() if _NAME_KEY.match(k)))
    return names if len(names) >= 2 else None


def _attributes(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not _NAME_KEY.match(k) and isinstance(v, str | int) and not is_id_key(k)}


def _others(value: Any, changed: set[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """The objects of a tool output, without the entity the write changes (nor anything inside it)."""
    if isinstance(value, dict):
        if any((k, norm(v)) in changed for k, v in value.items() if isinstance(v, str | int)):
            return
        yield value
        for v in value.values():
            yield from _others(v, changed)
    elif isinstance(value, list):
        for v in value:
            yield from _others(v, changed)


def _person_contradictions(view: TurnView, call: Call) -> list[Finding]:
    people = [(names, d) for d in dicts(call.args) if (names := _person(d)) is not None]
    if not people:
        return []
    # The entity the write changes holds the old values it replaces: its own people are no evidence.
    changed = {
        (key, norm(value))
        for key, value in (call.args or {}).items()
        if is_id_key(key) and not _OWNER_KEY.search(key) and isinstance(value, str | int)
    }
    for made in view.index.calls:
        if made.error or made.result is None or made.kind is not ToolKind.READ:
            continue
        for record in _others(parse_json(made.result), changed):
            if (names := _person(record)) is None:
                continue
            for given_names, given in people:
                if given_names != names:
                    continue
                recorded = _attributes(record)
                for key, value in _attributes(given).items():
                    if key in recorded and norm(recorded[key]) != norm(value):
                        who = " ".join(v for _, v in names)
                        return [
                            _finding(
                                call,
                                "contradicts_tool_output",
                                f"Rule: use the values tools returned. '{call.name}' passes {who} with "
                                f"{key}={value!r}, but '{made.name}' returned {key}={recorded[key]!r} for {who}. "
                                "Check with the user which one is right before writing it.",
                                Severity.ERROR,
                                key=key,
                                given=value,
                                recorded=recorded[key],
                            )
                        ]
    return []
