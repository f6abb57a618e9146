"""Memory: the key facts gathered so far, so the model does not re-ask or misremember them.

Facts are identifiers (tool-call arguments and top-level tool-output fields whose names look like
ids, and id-like tokens the user typed), the outcome of every write call, and what the user
explicitly confirmed (the assistant proposal their "yes" answered).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from detector_service.agents import text as t
from detector_service.agents.note import AgentInput, Note
from detector_service.agents.outputs import ID_KEY
from detector_service.agents.view import ConversationView, is_confirmation, parse_json
from detector_service.contract.profile import AgentName, Profile, ToolKind

MAX_VALUES_PER_KEY = 8
MAX_CONFIRMATIONS = 4
# Letters and digits mixed, five characters or more: order numbers, user handles, booking codes.
_ID_TOKEN = re.compile(r"(?<![\w@.])(?=[A-Za-z0-9_#-]*\d)(?=[A-Za-z0-9_#-]*[A-Za-z])[A-Za-z0-9_#-]{5,}(?![\w@])")


@lru_cache(maxsize=4096)  # the same user messages come back on every turn
def _id_tokens(message: str) -> tuple[str, ...]:
    return tuple(_ID_TOKEN.findall(message))


def _scalar_ids(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return []
    return [(str(k), str(v)) for k, v in value.items() if isinstance(v, str | int) and ID_KEY.search(str(k))]


def identifiers(view: ConversationView) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}

    def add(key: str, value: str) -> None:
        values = found.setdefault(key, [])
        if value not in values:
            values.append(value)

    for _, message in view.user_turns:
        for token in _id_tokens(message):
            add("mentioned by the user", token)
    for call in view.calls:
        for key, value in _scalar_ids(call.arguments):
            add(key, value)
        if call.output is not None and not call.failed:
            for key, value in _output_ids(call.output):
                add(key, value)
    return found


@lru_cache(maxsize=1024)  # tool outputs come back on every later turn
def _output_ids(output: str) -> tuple[tuple[str, str], ...]:
    return tuple(_scalar_ids(parse_json(output)))


def writes(view: ConversationView, profile: Profile) -> list[str]:
    out = []
    for call in view.calls:
        if view.kind_of(call.name) is not ToolKind.WRITE:
            continue
        status = "pending" if call.output is None else ("failed: " + t.clip(call.output, 80) if call.failed else "done")
        out.append(f"`{call.name}`({t.clip(call.raw_arguments, 120)}) → {status}")
    return out


def _details(proposal: str) -> str:
    """The sentences of a proposal that carry specifics (ids, amounts, dates), else its first sentence."""
    parts = t.sentences(proposal)
    specific = [p for p in parts if any(ch.isdigit() for ch in p) or _ID_TOKEN.search(p)]
    return " ".join(specific or parts[:1])


def confirmations(view: ConversationView) -> list[str]:
    out = []
    for index, message in view.user_turns:
        proposal = view.asked_before(index)
        if proposal and is_confirmation(message, proposal):
            out.append(f"user said {t.clip(message, 40)!r} to: {t.clip(_details(proposal), 200)}")
    return out[-MAX_CONFIRMATIONS:]


def build(inp: AgentInput) -> Note | None:
    lines = []
    for key, values in identifiers(inp.view).items():
        lines.append(f"{key}: {', '.join(values[-MAX_VALUES_PER_KEY:])}")
    lines += [f"write {w}" for w in writes(inp.view, inp.profile)]
    lines += [f"confirmed: {c}" for c in confirmations(inp.view)]
    if not lines:
        return None
    return Note(AgentName.MEMORY, "Facts so far", tuple(lines), priority=35)
