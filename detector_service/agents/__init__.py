"""Specialized agents (DESIGN §4): deterministic context builders over a conversation.

Each builder reads a :class:`~detector_service.agents.view.ConversationView` and returns a
:class:`~detector_service.agents.note.Note` (or nothing to say). They are pure and fast enough to
run inline before every model call; the proxy's injection module decides which run and formats them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from detector_service.agents import memory, outputs, planner, policy, suggestion, verifier
from detector_service.agents.note import AgentInput, Note
from detector_service.agents.policy import PolicyCache
from detector_service.agents.view import ConversationView
from detector_service.contract.profile import AgentName, Profile

if TYPE_CHECKING:
    from detector_service.contract.extraction import PolicyExtraction

__all__ = ["AgentInput", "ConversationView", "Note", "PolicyCache", "build_notes"]


def build_notes(
    agents: Sequence[AgentName],
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    profile: Profile,
    cache: PolicyCache,
    candidate: dict[str, Any] | None = None,
    extraction: PolicyExtraction | None = None,
) -> list[Note]:
    """Run the named agents over one conversation, in the given order; agents with nothing to say are skipped.

    ``extraction`` is the LLM-extracted rules of this conversation's policy, when the detector service
    has cached them; DCE uses it instead of raw policy sentences.
    """
    if not agents:
        return []
    view = ConversationView.build(messages, tools, profile)
    wants_suggestions = {AgentName.DCE, AgentName.TSA, AgentName.VERIFIER}.intersection(agents)
    ranked = tuple(suggestion.rank_tools(view)) if wants_suggestions else ()
    inp = AgentInput(view=view, profile=profile, suggestions=ranked, candidate=candidate)
    notes: list[Note] = []
    for agent in agents:
        note: Note | None
        if agent is AgentName.DCE:
            note = policy.build(inp, cache, extraction)
        elif agent is AgentName.TSA:
            note = suggestion.build(inp)
        elif agent is AgentName.TOR:
            note = outputs.build(inp)
        elif agent is AgentName.PLANNER:
            note = planner.build(inp)
        elif agent is AgentName.VERIFIER:
            note = verifier.build(inp)
        else:
            note = memory.build(inp)
        if note is not None:
            notes.append(note)
    return notes
