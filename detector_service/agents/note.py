"""What every context builder returns, and what it is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detector_service.agents.view import ConversationView, DeclaredTool
from detector_service.contract.profile import AgentName, Profile


@dataclass(frozen=True)
class Suggestion:
    tool: DeclaredTool
    matched: tuple[str, ...]  # the request words that matched, for the "why"
    score: float


@dataclass(frozen=True)
class Note:
    """One agent's contribution to the injected context. Higher ``priority`` survives budget trimming longer."""

    agent: AgentName
    title: str
    lines: tuple[str, ...]
    priority: int


@dataclass(frozen=True)
class AgentInput:
    view: ConversationView
    profile: Profile
    suggestions: tuple[Suggestion, ...] = ()  # tools that fit the open request, best first
    candidate: dict[str, Any] | None = None  # the proposed assistant message, when building after a decision

    @property
    def pending_tools(self) -> tuple[str, ...]:
        """Tools the next decision is likely about, most likely first."""
        return tuple(s.tool.name for s in self.suggestions)
