"""A supervised stream held for its verdict: the candidate assembled from deltas, and the chunks sent in its place.

Under ``enforce`` a streamed answer is split (:class:`HeldStream`): the text of a plain answer goes to the client at
once, tool-call deltas (and text that may belong to a rejected attempt) are held in a :class:`CandidateBuffer` until
the verdict. For an agent whose harness reads its actions from the text (ReAct), the text is the action: it is held
too, and sent after the verdict. What is then sent is built here so that the
client sees one coherent stream whatever happened upstream (retries included): every chunk carries
the first attempt's ``id``/``created``/``model``, the role is sent once, tool calls are numbered from
0 in the order sent, and exactly one chunk carries a ``finish_reason``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.supervision.quotes import Quoted, QuoteFilter, strip_quotes
from proxy.supervision.replies import unsaid

_ENVELOPE_KEYS = ("id", "object", "created", "model", "system_fingerprint")


@dataclass
class _Call:
    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: str = ""


@dataclass
class CandidateBuffer:
    """Folds the deltas of choice 0 into the complete assistant message they describe."""

    content: str = ""
    saw_content: bool = False
    finish_reason: str | None = None
    calls: dict[int, _Call] = field(default_factory=dict)

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if isinstance(text, str):
            self.content += text
            self.saw_content = self.saw_content or bool(text)
        for piece in delta.get("tool_calls") or ():
            call = self.calls.setdefault(int(piece.get("index", 0)), _Call())
            call.id = piece.get("id") or call.id
            call.type = piece.get("type") or call.type
            fn = piece.get("function") or {}
            call.name = fn.get("name") or call.name
            call.arguments += fn.get("arguments") or ""
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content if self.saw_content else None}
        if self.calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.name, "arguments": c.arguments}}
                for _, c in sorted(self.calls.items())
            ]
        return message


def content_delta(chunk: dict[str, Any], role_sent: bool) -> dict[str, Any] | None:
    """What of choice 0's delta may go to the client at once: everything but tool calls (and a repeated role)."""
    choices = chunk.get("choices") or ()
    if not choices:
        return None
    delta = choices[0].get("delta") or {}
    out = {k: v for k, v in delta.items() if k != "tool_calls" and not (k == "role" and role_sent)}
    if "role" in out:
        return out
    return out if out.get("content") or out.get("refusal") else None


@dataclass
class Envelope:
    fields: dict[str, Any]

    @classmethod
    def of(cls, chunk: dict[str, Any]) -> Envelope:
        return cls({k: chunk[k] for k in _ENVELOPE_KEYS if k in chunk})

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.fields, "choices": [choice], **extra}

    def usage_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        return {**self.fields, "choices": [], "usage": usage}


def tool_call_deltas(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One delta per tool call, each complete (id, type, name, whole arguments), indexed from 0."""
    return [
        {
            "tool_calls": [
                {
                    "index": i,
                    "id": call.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {
                        "name": (call.get("function") or {}).get("name", ""),
                        "arguments": (call.get("function") or {}).get("arguments", ""),
                    },
                }
            ]
        }
        for i, call in enumerate(message.get("tool_calls") or ())
    ]


def add_usage(total: dict[str, Any] | None, usage: object) -> dict[str, Any] | None:
    """Token counts summed over attempts: a retried turn costs what all its attempts cost."""
    if not isinstance(usage, dict):
        return total
    if total is None:
        return dict(usage)
    out = dict(total)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(key), int):
            out[key] = int(out.get(key) or 0) + usage[key]
    return out


@dataclass
class HeldStream:
    """One enforced stream across its attempts: what the client has seen, and what it is sent at the end.

    Text goes to the client as it comes only while it cannot belong to an attempt that may be rejected: on the first
    attempt, until its first tool-call delta (a plain answer streams untouched). From there on, and for every retried
    attempt, text is held with the calls and sent after the verdict, less what the client already has
    (:func:`~proxy.supervision.replies.unsaid`). A ReAct harness's text is its action (``hold_text``): it is never
    live. Quoted injected context is cut from all of it (:mod:`quotes`).
    """

    quoted: Quoted = field(default_factory=Quoted)
    envelope: Envelope | None = None
    role_sent: bool = False
    shown: str = ""  # content the client already has, across attempts
    usage: dict[str, Any] | None = None
    buffer: CandidateBuffer = field(default_factory=CandidateBuffer)  # the current attempt's candidate
    live: bool = True  # the current attempt's text goes to the client as it comes
    hold_text: bool = False  # the text carries the actions (ReAct): held until the verdict like tool calls
    quotes: QuoteFilter = field(init=False)

    def __post_init__(self) -> None:
        self.quotes = QuoteFilter(self.quoted)
        self.live = self.live and not self.hold_text

    def next_attempt(self, quoted: Quoted) -> None:
        self.buffer = CandidateBuffer()
        self.quoted = quoted
        self.live = False

    def take(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Fold an upstream chunk into the attempt; the chunk the client may see now, if any."""
        self.envelope = self.envelope or Envelope.of(chunk)
        self.usage = add_usage(self.usage, chunk.get("usage"))
        choices = chunk.get("choices") or ()
        if not choices:
            return None
        self.buffer.add(choices[0])
        self.live = self.live and not self.buffer.has_tool_calls
        if not self.live:
            return None
        delta = content_delta(chunk, self.role_sent)
        if delta is None:
            return None
        if delta.get("content"):
            text = self.quotes.feed(delta["content"])
            if text:
                delta["content"] = text
            elif not ("role" in delta or delta.get("refusal")):
                return None
            else:
                delta["content"] = ""
        self.role_sent = True
        self.shown += delta.get("content") or ""
        return self.envelope.chunk(delta)

    def candidate(self) -> tuple[dict[str, Any], bool]:
        """The attempt's assistant message, quoted context cut from its text, and whether any was."""
        message = self.buffer.message()
        if not message["content"]:
            return message, False
        message["content"], quoted = strip_quotes(message["content"], self.quoted)
        return message, quoted

    def text_sent(self, candidate: dict[str, Any]) -> bool:
        """The attempt is text the client already has: nothing to hold or replace, only guidance to gain. (An
        empty reply sent nothing yet, so it is judged like a call and can still be retried.)"""
        return self.live and not self.buffer.has_tool_calls and bool(str(candidate.get("content") or "").strip())

    def ending(
        self, final: Mapping[str, Any], finish: str, trailer: dict[str, Any], with_usage: bool
    ) -> list[dict[str, Any]]:
        """The chunks after the verdict: the role if not yet sent, the answer's text the client does not have yet
        (never repeated, never glued to what it has), the held (or replacing) tool calls, the one chunk with the
        ``finish_reason`` (and ``trailer``), the usage when asked for."""
        envelope = self.envelope or Envelope({"id": "chatcmpl-fama", "object": "chat.completion.chunk", "created": 0})
        out: list[dict[str, Any]] = []
        if not self.role_sent:
            out.append(envelope.chunk({"role": "assistant", "content": None}))
        text = unsaid(self.shown, str(final.get("content") or ""))
        if text:
            out.append(envelope.chunk({"content": text}))
            self.shown += text
        if final.get("tool_calls"):
            out.extend(envelope.chunk(delta) for delta in tool_call_deltas(final))
        out.append(envelope.chunk({}, finish, **trailer))
        if with_usage:
            out.append(envelope.usage_chunk(self.usage))
        return out
