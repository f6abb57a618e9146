"""A typed, read-only view of one turn, and the conversation index it is built on.

``ConversationIndex`` absorbs a conversation one message at a time and keeps what the detectors ask
about: the values seen in tool outputs and user messages, the calls made so far with their results, the
latest user message and what the assistant said right before it. Replay extends one index as it
advances, so checking every turn of a conversation costs time linear in its length. ``TurnView`` pairs
an index with the candidate assistant message; detectors only read it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from detector_service.contract.profile import Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.pairing import CallPairing

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.@]*[A-Za-z0-9]|[A-Za-z0-9]")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_])\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![A-Za-z0-9_])")
# A call written as text: a ReAct "Action:" / "Action Input:" line, or a JSON object naming a function.
_TEXT_CALL = re.compile(r'^\s*Action( Input)?\s*:|"name"\s*:\s*"[^"]+"\s*,\s*"(arguments|parameters)"\s*:', re.M)
_ERROR_PREFIX = re.compile(r"^\s*(error\b|exception\b|traceback\b)", re.IGNORECASE)


def text_of(content: Any) -> str:
    """The text of an OpenAI message ``content`` (a string, ``None`` or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def is_error_output(message: Mapping[str, Any], text: str | None = None) -> bool:
    """Whether a tool message reports a failure (an ``error`` flag, or text opening with "Error")."""
    body = text_of(message.get("content")) if text is None else text
    return bool(message.get("error")) or bool(_ERROR_PREFIX.match(body))


def norm(value: Any) -> str:
    """A canonical string for comparing scalar values across JSON, free text and arguments."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(round(f, 6))
    s = str(value).strip().lower()
    if s.startswith("#") and s[1:2].isalnum():
        s = s[1:]  # "#W2378156" (an order number as written) and "W2378156" (as a word in text) are one value
    try:
        f = float(s.replace(",", "").lstrip("$"))
    except ValueError:
        return s
    if f != f or f in (float("inf"), float("-inf")):  # NaN/inf spelled as words stay words
        return s
    return str(int(f)) if f.is_integer() else repr(round(f, 6))


def leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Scalar leaves of a JSON value as (innermost key, value)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v, key)
    elif value is not None:
        yield key, value


def dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from dicts(v)
    elif isinstance(value, list):
        for v in value:
            yield from dicts(v)


def parse_json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


@lru_cache(maxsize=8192)
def text_values(text: str) -> frozenset[str]:
    """Tokens and numbers of free text, normalized like ``norm``.

    Cached: every later turn of a conversation carries the same messages again.
    """
    out = {m.group(0).lower().rstrip(".") for m in _TOKEN.finditer(text)}
    # An e-mail address also names its local part, which is often the account id.
    out |= {t.split("@", 1)[0] for t in out if "@" in t}
    for m in _NUMBER.finditer(text):
        out.add(norm(m.group(1).replace(",", "") + (m.group(2) or "")))
    return frozenset(out)


EntityPairs = tuple[tuple[tuple[str, str], dict[str, Any]], ...]


@lru_cache(maxsize=8192)
def output_digest(text: str) -> tuple[frozenset[str], EntityPairs]:
    """The values of one tool output and its (id key, value) -> object pairs. Cached like ``text_values``.

    The objects are shared between callers and must be treated as read-only.
    """
    parsed = parse_json(text)
    if parsed is None or isinstance(parsed, str):
        return text_values(text if parsed is None else parsed), ()
    # Ids can be the keys of an object ({"credit_card_123": {...}} in a user's payment methods): grounded too.
    values = frozenset(norm(v) for _, v in leaves(parsed)) | frozenset(
        norm(k) for obj in dicts(parsed) for k in obj if is_id_value(k)
    )
    pairs = tuple(
        ((k, norm(v)), obj)
        for obj in dicts(parsed)
        for k, v in obj.items()
        if isinstance(v, str | int) and not isinstance(v, bool) and is_id_key(k)
    )
    return values, pairs


@dataclass(slots=True)
class Call:
    """One tool call, as made by the assistant, with its result once the tool answered."""

    index: int  # index in ``messages`` of the assistant message that made it
    call_id: str | None
    name: str
    arguments: str
    args: dict[str, Any] | None
    kind: ToolKind
    result: str | None = None
    error: bool = False

    @property
    def key(self) -> str:
        if self.args is None:
            return f"{self.name}:{self.arguments}"
        return f"{self.name}:{orjson.dumps(self.args, option=orjson.OPT_SORT_KEYS).decode()}"


def tool_calls_of(message: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The message's tool calls that are objects; anything else a client sent is not a call."""
    calls = message.get("tool_calls")
    return [c for c in calls if isinstance(c, Mapping)] if isinstance(calls, list) else []


def parse_call(raw: Mapping[str, Any], index: int, kinds: ToolKinds) -> Call:
    fn = raw.get("function")
    if not isinstance(fn, Mapping):
        fn = {}
    name = str(fn.get("name") or "")
    arguments = fn.get("arguments")
    args: dict[str, Any] | None
    if isinstance(arguments, dict):
        args, arguments = arguments, orjson.dumps(arguments).decode()
    else:
        arguments = "" if arguments is None else str(arguments)
        parsed = parse_json(arguments) if arguments.strip() else {}
        args = parsed if isinstance(parsed, dict) else None
    call_id = raw.get("id")
    return Call(
        index=index,
        call_id=call_id if isinstance(call_id, str) else None,  # ids are strings; anything else pairs by position
        name=name,
        arguments=arguments,
        args=args,
        kind=kinds.kind(name),
    )


class UserDeviceCalls:
    """Dual control (the user works a device with tools of their own, as in tau2 telecom): the user's calls go
    to the environment and their results come back to the user; the agent sees neither. Fed a conversation's
    messages in order, ``hides`` says which of them are that traffic."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def hides(self, message: Mapping[str, Any]) -> bool:
        role = message.get("role")
        if role == "user":
            calls = tool_calls_of(message)
            self._ids.update(str(c.get("id")) for c in calls)
            return bool(calls)
        if role in ("tool", "function"):
            return message.get("requestor") == "user" or str(message.get("tool_call_id")) in self._ids
        return False


@dataclass
class ConversationIndex:
    """What the detectors need to know about the conversation so far; grows one message at a time."""

    kinds: ToolKinds
    size: int = 0
    system_text: str = ""
    user_count: int = 0
    latest_user_text: str = ""
    latest_user_index: int = -1
    # The assistant's last words to the user before the latest user message: where the action was stated.
    stated_before_user: str = ""
    last_assistant_text: str = ""
    earlier_user: tuple[str, str, int] = ("", "", -1)  # the user message before it: text, what it answered, index
    user_values: set[str] = field(default_factory=set)
    told_values: set[str] = field(default_factory=set)  # values the assistant said to the user
    told_since_write: set[str] = field(default_factory=set)  # the same, since the latest successful write
    recent_calls: Counter[str] = field(default_factory=Counter)  # calls since the latest user message
    tool_values: set[str] = field(default_factory=set)
    read_values: set[str] = field(default_factory=set)  # values read back from, or looked up with, read tools
    # tool name -> values its successful calls looked up or returned, for "prior read of the same id" rules
    values_by_tool: dict[str, set[str]] = field(default_factory=dict)
    # (id-like key, value) -> objects of tool outputs holding that pair, for contradiction checks
    entities: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    pairing: CallPairing = field(default_factory=CallPairing)
    call_counts: Counter[str] = field(default_factory=Counter)
    writes: int = 0
    reads: int = 0
    calls_since_user: int = 0
    consecutive_errors: int = 0  # tool errors in a row since the latest user message
    last_error_tool: str | None = None
    failed_keys: set[str] = field(default_factory=set)  # calls (name + arguments) that returned an error
    device: UserDeviceCalls = field(default_factory=UserDeviceCalls)  # dual control: not the agent's
    text_calls: bool = False  # the agent wrote calls as text (ReAct "Action:" lines, call objects): unseen calls
    text_actions: bool = False  # text actions were read into calls (``react``): text left is what the user got

    @classmethod
    def build(
        cls, messages: Iterable[Mapping[str, Any]], kinds: ToolKinds, *, text_actions: bool = False
    ) -> ConversationIndex:
        index = cls(kinds=kinds, text_actions=text_actions)
        for m in messages:
            index.add(m)
        return index

    def add(self, message: Mapping[str, Any]) -> None:
        role = message.get("role")
        i = self.size
        self.size += 1
        if self.device.hides(message):
            return
        if role == "system" or role == "developer":
            self.system_text += text_of(message.get("content")) + "\n"
        elif role == "user":
            text = text_of(message.get("content"))
            self.user_count += 1
            self.earlier_user = (self.latest_user_text, self.stated_before_user, self.latest_user_index)
            self.latest_user_text = text
            self.latest_user_index = i
            self.stated_before_user = self.last_assistant_text
            self.user_values |= text_values(text)
            self.calls_since_user = 0
            self.recent_calls.clear()
            # New words from the user can make the same tool work again: only errors since then count.
            self.consecutive_errors = 0
        elif role == "assistant":
            text = text_of(message.get("content"))
            if text.strip():
                self.last_assistant_text = text
                self.text_calls = self.text_calls or (not self.text_actions and bool(_TEXT_CALL.search(text)))
                self.told_values |= text_values(text)
                self.told_since_write |= text_values(text)
            for raw in tool_calls_of(message):
                call = parse_call(raw, i, self.kinds)
                self.calls.append(call)
                self.pairing.call(call.call_id)
                self.call_counts[call.key] += 1
                self.recent_calls[call.key] += 1
                self.calls_since_user += 1
                if call.kind is ToolKind.WRITE:
                    self.writes += 1
                elif call.kind is ToolKind.READ:
                    self.reads += 1
                    if call.args:
                        self.read_values.update(norm(v) for _, v in leaves(call.args))
        elif role == "tool" or role == "function":
            self._add_tool_output(message)

    def _add_tool_output(self, message: Mapping[str, Any]) -> None:
        text = text_of(message.get("content"))
        at = self.pairing.output(message.get("tool_call_id"))
        call = None if at is None else self.calls[at]
        error = is_error_output(message, text)
        if call is not None:
            call.result = text
            call.error = error
        if error:
            self.consecutive_errors += 1
            self.last_error_tool = call.name if call else None
            if call is not None:
                self.failed_keys.add(call.key)
            return
        self.consecutive_errors = 0
        if call is not None and call.kind is ToolKind.WRITE:
            # The data changed: earlier failures and read results may no longer hold, so neither retrying a
            # call that failed nor reading the same thing again is a loop from here on.
            self.failed_keys.clear()
            self.told_since_write = set()
            for key in [k for k in self.recent_calls if self.kinds.kind(k.split(":", 1)[0]) is not ToolKind.WRITE]:
                del self.recent_calls[key]
        values, pairs = output_digest(text)
        for pair, obj in pairs:
            self.entities.setdefault(pair, []).append(obj)
        self.tool_values |= values
        if call is not None:
            seen = self.values_by_tool.setdefault(call.name, set())
            seen |= values
            if call.args:
                seen.update(norm(v) for _, v in leaves(call.args))
            if call.kind is ToolKind.READ:
                self.read_values |= values

    def grounded(self, value: Any) -> bool:
        v = norm(value)
        return v in self.tool_values or v in self.user_values or self._grounded_words(v)

    def _grounded_words(self, v: str) -> bool:
        # Multi-word values (names, addresses) are grounded when every word was seen.
        words = v.split()
        if len(words) < 2:
            return False
        return all(w.strip(",.") in self.tool_values or w.strip(",.") in self.user_values for w in words)


_ID_KEY = re.compile(r"(^|_)(id|ids|number|code|key)$|^(id|uuid)$", re.IGNORECASE)
_ID_VALUE = re.compile(r"^(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{5,}$")
_AMOUNT_KEY = re.compile(r"amount|price|cost|total|fee|refund|balance|count|quantity|baggages|num_", re.IGNORECASE)


def is_id_key(key: str) -> bool:
    return bool(_ID_KEY.search(key))


def is_id_value(value: Any) -> bool:
    return isinstance(value, str) and bool(_ID_VALUE.match(value))


def is_amount_key(key: str) -> bool:
    return bool(_AMOUNT_KEY.search(key))


@dataclass(frozen=True, slots=True)
class TurnView:
    """One candidate assistant message and the conversation before it. Read-only for detectors."""

    index: ConversationIndex
    candidate: Mapping[str, Any]
    calls: tuple[Call, ...]
    tools: Mapping[str, Mapping[str, Any]]  # tool name -> OpenAI ``function`` object
    profile: Profile

    @property
    def text(self) -> str:
        return text_of(self.candidate.get("content"))

    @classmethod
    def of(
        cls,
        index: ConversationIndex,
        candidate: Mapping[str, Any],
        tools: Mapping[str, Mapping[str, Any]],
        profile: Profile,
    ) -> TurnView:
        calls = tuple(parse_call(raw, index.size, index.kinds) for raw in tool_calls_of(candidate))
        return cls(index=index, candidate=candidate, calls=calls, tools=tools, profile=profile)


def agent_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the agent itself sees: without the user's own tool calls and their results (dual control)."""
    device = UserDeviceCalls()
    return [m for m in messages if not device.hides(m)]


def tools_by_name(tools: Iterable[Any]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for t in tools:
        if isinstance(t, dict):
            fn = t.get("function") if isinstance(t.get("function"), dict) else t
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str):
                out[name] = t
    return out
