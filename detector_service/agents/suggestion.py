"""TSA, tool suggestion: which declared tools fit the user's open request next, and why.

Tools are ranked by the weighted overlap between the request's stems and each tool's name,
description and parameter names. A write tool is suggested together with the read tools that take
the same required identifier and have not been called yet, since a write should follow a look-up.
"""

from __future__ import annotations

from functools import lru_cache

from detector_service.agents import text as t
from detector_service.agents.note import AgentInput, Note, Suggestion
from detector_service.agents.view import ConversationView, DeclaredTool
from detector_service.contract.profile import AgentName, ToolKind

MAX_SUGGESTIONS = 3


def request_text(view: ConversationView) -> str:
    """The user's open request: the latest message, widened when it is only a short reply ("yes", an id)."""
    latest = view.latest_user
    if len(t.stems(latest)) >= 4 or len(view.user_turns) < 2:
        return latest
    return "\n".join([view.user_turns[-2][1], view.last_assistant_text, latest])


def rank_tools(view: ConversationView, limit: int = MAX_SUGGESTIONS) -> list[Suggestion]:
    """Declared read and write tools by fit to the open request; earlier user messages count half."""
    candidates = [tool for tool in view.tools if tool.kind is not ToolKind.GENERIC]
    if not candidates:
        return []
    request = request_text(view)
    words = {w.lower().strip(".,!?;:'\"()") for w in request.replace("_", " ").split()}
    word_stems = {w: t.frozen_stems(w) for w in words if w}
    query = t.frozen_stems(request)
    earlier = set().union(*(t.frozen_stems(m) for _, m in view.user_turns[:-1])) - query
    docs = [
        _doc_stems(tool.name, tool.description, tuple(map(str, tool.parameters.get("properties", {}))))
        for tool in candidates
    ]
    weights = _weights(tuple(docs))
    ranked = []
    for tool, doc in zip(candidates, docs, strict=True):
        name = _doc_stems(tool.name, "", ())
        # Name hits count twice: a tool's name says what it does more reliably than its description.
        score = t.overlap_score(query, doc, weights) + t.overlap_score(query, name, weights)
        score += 0.5 * (t.overlap_score(earlier, doc, weights) + t.overlap_score(earlier, name, weights))
        if score > 0:
            matched = sorted(w for w, ws in word_stems.items() if ws & doc)
            ranked.append(Suggestion(tool, tuple(matched), score))
    ranked.sort(key=lambda s: -s.score)
    # Weak matches (a shared generic word such as "reservation") are noise next to a strong one.
    return [s for s in ranked[:limit] if s.score >= 0.5 * ranked[0].score]


@lru_cache(maxsize=256)
def _weights(docs: tuple[frozenset[str], ...]) -> dict[str, float]:
    return t.idf(docs)


@lru_cache(maxsize=4096)  # the same tool list comes with every turn of a deployment
def _doc_stems(name: str, description: str, parameters: tuple[str, ...]) -> frozenset[str]:
    return frozenset(t.stems(f"{name} {description} {' '.join(parameters)}"))


def _lookups_first(view: ConversationView, write: DeclaredTool) -> list[str]:
    called = {c.name for c in view.calls if not c.failed}
    keys = set(write.required)
    return [
        tool.name
        for tool in view.tools
        if tool.kind is ToolKind.READ and tool.name not in called and keys.intersection(tool.required)
    ]


def build(inp: AgentInput) -> Note | None:
    ranked = inp.suggestions
    if not ranked:
        return None
    lines = []
    for s in ranked:
        why = ", ".join(f"'{m}'" for m in s.matched[:5]) or "its description"
        line = f"`{s.tool.name}` ({s.tool.kind.value}): the request mentions {why}."
        if s.tool.kind is ToolKind.WRITE:
            first = _lookups_first(inp.view, s.tool)
            if first:
                line += f" Look up with {', '.join(f'`{n}`' for n in first[:2])} first."
            line += " Needs the user's explicit confirmation."
        lines.append(line)
    return Note(AgentName.TSA, "Tools that fit the open request", tuple(lines), priority=20)
