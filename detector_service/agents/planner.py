"""Planner: the user's requests so far as a checklist of sub-goals, the open ones marked.

A request is a user sentence with a request cue ("I want", "can you", a question...). It counts as
done once a later tool call that succeeded shares its action words (e.g. "cancel … reservation" and
``cancel_reservation``); a request naming an action verb needs a write call to count as done.
"""

from __future__ import annotations

import re

from detector_service.agents import text as t
from detector_service.agents.note import AgentInput, Note
from detector_service.agents.view import ConversationView, is_confirmation
from detector_service.contract.profile import AgentName, Profile, ToolKind

MAX_ITEMS = 8
_CUE = re.compile(
    r"\b(i(?:'d| would)? (?:like|want|need|wish)|i'm (?:looking|trying|hoping)|can you|could you|would you|"
    r"please|help me|i have to|let's|also|instead)\b|\?\s*$",
    re.IGNORECASE,
)


def requests(view: ConversationView) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for index, message in view.user_turns:
        if is_confirmation(message) and len(t.stems(message)) < 4:
            continue
        for sentence in t.sentences(message):
            if _CUE.search(sentence) and len(t.stems(sentence)) >= 2:
                found.append((index, sentence))
    return found


def is_done(view: ConversationView, profile: Profile, index: int, sentence: str) -> bool:
    want = t.stems(sentence)
    for call in view.calls:
        if call.index <= index or call.failed or call.output is None:
            continue
        name = t.stems(call.name)
        verb_hit = bool(want & name)
        if not verb_hit:
            continue
        kind = view.kind_of(call.name)
        if kind is ToolKind.WRITE or len(want & name) >= 2:
            return True
    return False


def build(inp: AgentInput) -> Note | None:
    found = requests(inp.view)
    if not found:
        return None
    lines = []
    open_count = 0
    for index, sentence in found[-MAX_ITEMS:]:
        done = is_done(inp.view, inp.profile, index, sentence)
        open_count += not done
        lines.append(f"[{'x' if done else ' '}] {t.clip(sentence, 200)}")
    title = f"User requests ({open_count} open)"
    return Note(AgentName.PLANNER, title, tuple(lines), priority=30)
