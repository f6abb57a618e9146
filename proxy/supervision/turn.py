"""One supervised chat turn's state, carried from the request to the answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detector_service.contract.active_profile import ActiveProfile
from detector_service.contract.wire import Action, Category
from detector_service.turn import tools_by_name
from proxy.supervision.decisions import Decision
from proxy.supervision.quotes import Quoted, strip_quotes
from proxy.supervision.sessions import SessionRef, SessionState
from proxy.upstream import normalize

ACTING = frozenset({Action.RETRY, Action.REWRITE, Action.BLOCK})  # what enforce mode changes

if TYPE_CHECKING:
    from proxy.supervision.decisions import Feedback


@dataclass
class Turn:
    """Everything one supervised chat turn carries from the request to the answer."""

    ref: SessionRef
    state: SessionState
    messages: list[dict[str, Any]]  # as the client sent them: what the detectors judge
    tools: list[dict[str, Any]]
    body: dict[str, Any]  # as sent upstream, context message included
    injected: tuple[str, ...]
    active: ActiveProfile  # the profile in force when the turn started: it keeps it to its end
    labels: list[str] = field(default_factory=list)
    degraded: str | None = None
    retrying: tuple[Category, ...] = ()  # categories of the retry in flight, to count its outcome
    api: str = "chat"  # the API the client called (chat, responses)
    added: list[str] = field(default_factory=list)  # what the proxy wrote into the conversation: context, feedback

    def quoted(self) -> Quoted:
        """What a reply of this turn must not quote back to the user."""
        return Quoted.of(self.added)

    def cut_quotes(self, message: dict[str, Any], in_place: bool) -> tuple[dict[str, Any], bool]:
        """``message`` with what its text quotes of :meth:`quoted` cut (in place, or on a copy), and whether any was."""
        if not isinstance(message.get("content"), str) or not message["content"]:
            return message, False
        text, quoted = strip_quotes(message["content"], self.quoted())
        if not quoted:
            return message, False
        if not in_place:
            return {**message, "content": text}, True
        message["content"] = text
        return message, True

    @property
    def tool_names(self) -> frozenset[str]:
        return frozenset(tools_by_name(self.tools))

    def retry_body(self, feedback: Feedback) -> dict[str, Any]:
        """The next attempt's request: the conversation as sent, plus ``feedback`` (kept among what is added)."""
        self.added.append(str(feedback["content"]))
        # Fresh message dicts: the upstream adapter edits messages in place.
        messages = [dict(m) for m in self.body["messages"]]
        return normalize.adapt_for_upstream({**self.body, "messages": [*messages, feedback]})

    def apply(self, decision: Decision) -> tuple[Category, ...]:
        """Take an attempt's decision into the turn (labels, degraded, the retry in flight) and the session (guidance,
        agents switched on); the categories of the earlier retry this attempt settles."""
        settled = self.retrying
        self.retrying = decision.categories if decision.action is Action.RETRY else ()
        if decision.changes_answer:
            self.labels.extend(label for label in decision.labels if label not in self.labels)
        if decision.degraded is not None:
            self.degraded = decision.degraded
        if decision.findings and decision.intended in ACTING:
            self.state.would_act += 1
        self.state.add_guidance(decision.guidance)
        self.state.activate(decision.activate)
        return settled


def replace_message(choice: dict[str, Any], message: Mapping[str, Any]) -> None:
    """Put ``message`` (a retry's or a block's answer) in place of the choice's message, keeping its other fields."""
    original = choice.get("message") or {}
    replaced = {k: v for k, v in original.items() if k not in ("content", "tool_calls")}
    replaced.update({"role": "assistant", "content": message.get("content")})
    if message.get("tool_calls"):
        replaced["tool_calls"] = message["tool_calls"]
    choice["message"] = replaced
    choice["finish_reason"] = "tool_calls" if message.get("tool_calls") else "stop"
