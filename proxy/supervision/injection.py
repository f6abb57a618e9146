"""Pre-decision context injection (DESIGN §4): which specialized agents run, and the one message they add.

Active agents are the profile's ``agents`` plus those switched on in this session by earlier findings
(:data:`proxy.supervision.decisions.TRIGGERS`: a WRCO finding turns on TOR, DCV turns on Verifier and DCE, and so
on).

The injection is exactly **one** added ``system`` message, placed right after the request's leading
system/developer message(s) (first when there are none). Its format is stable, versioned and meant
to be read by the model and grepped by operators::

    [FAMA context v1] Notes from the supervisor for your next step. Follow them; do not quote them to the user.
    ## Correction from the previous turn
    - <guidance left by the previous turn's findings>
    ## <Agent>: <title>
    - <line>
    [/FAMA context]

Sections appear in priority order: the carried correction, then Verifier, DCE, TOR, Memory, Planner,
TSA. The message stays under ``profile.injection_token_budget`` (approximate tokens, four characters
each): lines of the lowest-priority section are dropped first, then whole sections. A budget of 0, or
nothing to say, adds no message. The client's own messages are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from detector_service.agents import PolicyCache, build_notes
from detector_service.contract.profile import AgentName, Profile
from proxy.metrics import ProxyMetrics
from proxy.supervision.decisions import AGENT_ORDER
from proxy.supervision.sessions import SessionState

if TYPE_CHECKING:
    from detector_service.contract.extraction import PolicyExtraction

FORMAT_VERSION = 1
MARKER = "[FAMA context"  # how the message opens, whatever its version
OPENING = f"{MARKER} v{FORMAT_VERSION}] Notes from the supervisor for your next step. Follow them; do not quote them to the user."
CLOSING = "[/FAMA context]"
GUIDANCE_TITLE = "Correction from the previous turn"
GUIDANCE_PRIORITY = 100
GUIDANCE_LABEL = "guidance"  # the ``agent`` label of the injections metric for carried guidance


def approx_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def active_agents(profile: Profile, state: SessionState) -> list[AgentName]:
    wanted = set(profile.agents) | set(state.agents)
    return [a for a in AGENT_ORDER if a in wanted]


@dataclass
class Section:
    label: str  # agent name, or ``guidance``
    title: str
    lines: list[str]
    priority: int

    def render(self) -> list[str]:
        return [f"## {self.title}", *(f"- {line}" for line in self.lines)]


def fit(sections: list[Section], budget: int) -> list[Section]:
    """Drop lines from the lowest-priority sections until the rendered message is within ``budget`` tokens."""
    kept = sorted((Section(s.label, s.title, list(s.lines), s.priority) for s in sections), key=lambda s: -s.priority)
    # A few dozen short lines at most: re-rendering per dropped line is simpler than tracking deltas.
    while kept and approx_tokens(render(kept)) > budget:
        last = kept[-1]
        if last.lines:
            last.lines.pop()
        if not last.lines:
            kept.pop()
    return kept


def render(sections: Sequence[Section]) -> str:
    body = [line for s in sections for line in s.render()]
    return "\n".join([OPENING, *body, CLOSING])


def insertion_index(messages: Sequence[dict[str, Any]]) -> int:
    i = 0
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        i += 1
    return i


@dataclass(frozen=True)
class Injection:
    messages: list[dict[str, Any]]  # the request's messages with the context message added (or unchanged)
    text: str | None  # the added message's content, None when nothing was added
    labels: tuple[str, ...]  # agents (and ``guidance``) whose sections made it in


class Injector:
    def __init__(self, profile: Profile, metrics: ProxyMetrics | None = None, cache: PolicyCache | None = None) -> None:
        self.profile = profile
        self.metrics = metrics
        self.cache = cache or PolicyCache()

    def sections(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        state: SessionState,
        extraction: PolicyExtraction | None = None,
        profile: Profile | None = None,
    ) -> list[Section]:
        profile = profile or self.profile
        out: list[Section] = []
        if state.guidance:
            out.append(Section(GUIDANCE_LABEL, GUIDANCE_TITLE, list(state.guidance), GUIDANCE_PRIORITY))
        agents = active_agents(profile, state)
        notes = build_notes(agents, messages, tools, profile, self.cache, extraction=extraction)
        out += [Section(n.agent.value, f"{n.agent.value}: {n.title}", list(n.lines), n.priority) for n in notes]
        return out

    def inject(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        state: SessionState,
        extraction: PolicyExtraction | None = None,
        read: Sequence[dict[str, Any]] | None = None,
        profile: Profile | None = None,
    ) -> Injection:
        """The request's messages plus the context message; ``extraction`` (cached LLM DCE rules) is optional.
        ``read`` is the conversation as the agents read it (a ReAct harness's text actions as native calls, message
        for message); by default the messages themselves. ``profile`` is the turn's (by default the one this
        injector was made with)."""
        profile = profile or self.profile
        budget = profile.injection_token_budget
        if budget <= 0:
            return Injection(list(messages), None, ())
        kept = fit(self.sections(messages if read is None else read, tools, state, extraction, profile), budget)
        if not kept:
            return Injection(list(messages), None, ())
        text = render(kept)
        out = list(messages)
        out.insert(insertion_index(messages), {"role": "system", "content": text})
        labels = tuple(s.label for s in kept)
        if self.metrics is not None:
            for label in labels:
                self.metrics.injections.labels(agent=label).inc()
        return Injection(out, text, labels)
