"""A read-only, typed view over one conversation in OpenAI chat format, built in one linear pass."""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from detector_service.confirmation import accepts
from detector_service.contract.profile import Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.pairing import CallPairing
from detector_service.turn import UserDeviceCalls, tool_calls_of


def text_of(content: Any) -> str:
    """The text of a message ``content``: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


@lru_cache(maxsize=1024)  # tool outputs are resent (and re-read) on every later turn; callers never mutate
def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def is_confirmation(text: str, asked: str = "") -> bool:
    """Whether a user message agrees to go ahead with what the assistant's message ``asked``: the same test the
    DCV detector applies, so the context the agents inject never calls a turn confirmed that the detectors would
    flag, nor asks again for a go-ahead they accept."""
    return accepts(text, asked)


def tool_kind(name: str, profile: Profile, declared: Mapping[str, Any] | None = None) -> ToolKind:
    """Read or write, resolved as the detectors resolve it (:mod:`detector_service.contract.toolkinds`)."""
    return ToolKinds(profile, [declared] if declared is not None else []).kind(name)


@dataclass(frozen=True)
class ToolCall:
    index: int  # position of the assistant message in ``messages``
    id: str | None
    name: str
    raw_arguments: str
    arguments: dict[str, Any] | None  # None when the arguments are not a JSON object
    output: str | None = None
    output_index: int | None = None

    @property
    def failed(self) -> bool:
        return self.output is not None and self.output.lstrip().lower().startswith(("error", "exception"))


@dataclass(frozen=True)
class DeclaredTool:
    name: str
    description: str
    parameters: dict[str, Any]
    kind: ToolKind

    @property
    def required(self) -> list[str]:
        req = self.parameters.get("required")
        return [str(r) for r in req] if isinstance(req, list) else []


def _joined_policy(system: list[str], profile: Profile) -> str:
    if not system and profile.policy:
        return profile.policy
    return "\n\n".join(system)


def policy_text(messages: Sequence[dict[str, Any]], profile: Profile) -> str:
    """The policy DCE reads: the system/developer messages, else the profile's ``policy``.

    The proxy and the detector service both key cached extractions by this text's hash.
    """
    system = [text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return _joined_policy(system, profile)


@dataclass
class ConversationView:
    messages: Sequence[dict[str, Any]]
    tools: list[DeclaredTool]
    system_text: str
    kinds: ToolKinds
    user_turns: list[tuple[int, str]] = field(default_factory=list)
    assistant_turns: list[tuple[int, str]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def build(
        cls, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]], profile: Profile
    ) -> ConversationView:
        kinds = ToolKinds(profile, tools)
        declared: list[DeclaredTool] = []
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
            declared.append(
                DeclaredTool(fn["name"], str(fn.get("description") or ""), params or {}, kinds.kind(fn["name"]))
            )
        system: list[str] = []
        view = cls(messages=messages, tools=declared, system_text="", kinds=kinds)
        pairing = CallPairing()  # the detectors' rule (turn.ConversationIndex)
        device = UserDeviceCalls()  # dual control: the user's own device calls, which the agent never sees
        for i, m in enumerate(messages):
            if device.hides(m):
                continue
            role = m.get("role")
            text = text_of(m.get("content"))
            if role in ("system", "developer"):
                system.append(text)
            elif role == "user":
                view.user_turns.append((i, text))
            elif role == "assistant":
                if text:
                    view.assistant_turns.append((i, text))
                for call in tool_calls_of(m):
                    fn = call.get("function")
                    fn = fn if isinstance(fn, Mapping) else {}
                    raw = fn.get("arguments")
                    raw = raw if isinstance(raw, str) else json.dumps(raw)
                    args = parse_json(raw)
                    call_id = call.get("id")
                    call_id = call_id if isinstance(call_id, str) else None  # anything else pairs by position
                    tc = ToolCall(i, call_id, str(fn.get("name") or ""), raw, args if isinstance(args, dict) else None)
                    pairing.call(tc.id)
                    view.calls.append(tc)
            elif role in ("tool", "function"):
                pos = pairing.output(m.get("tool_call_id"))
                if pos is not None:
                    c = view.calls[pos]
                    view.calls[pos] = ToolCall(c.index, c.id, c.name, c.raw_arguments, c.arguments, text, i)
        view.system_text = _joined_policy(system, profile)
        return view

    @property
    def latest_user(self) -> str:
        return self.user_turns[-1][1] if self.user_turns else ""

    @property
    def last_assistant_text(self) -> str:
        return self.assistant_turns[-1][1] if self.assistant_turns else ""

    def asked_before(self, index: int) -> str:
        """The assistant's last words before the message at ``index``: what a user message there answers."""
        before = bisect.bisect_left([i for i, _ in self.assistant_turns], index)
        return self.assistant_turns[before - 1][1] if before else ""

    def tool(self, name: str) -> DeclaredTool | None:
        return next((t for t in self.tools if t.name == name), None)

    def kind_of(self, name: str) -> ToolKind:
        return self.kinds.kind(name)

    def confirmed_by_user(self, profile: Profile) -> bool:
        """Whether the latest user message explicitly confirms and no write has used that confirmation yet."""
        if not self.user_turns:
            return False
        since = self.user_turns[-1][0]
        if not is_confirmation(self.latest_user, self.asked_before(since)):
            return False
        return not any(c.index > since and self.kind_of(c.name) is ToolKind.WRITE for c in self.calls)
