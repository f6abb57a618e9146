"""Actions an agent writes as text, and the one native-shaped conversation the detectors and agents read.

Harnesses write an agent's actions in one of three dialects (``Profile.dialect``):

- ``native``: OpenAI ``tool_calls``, tool results as ``tool`` messages;
- ``react``: text. tau-bench's ReAct agent (and many harnesses around open models) writes ``Thought: ...``
  then ``Action:`` and a JSON object ``{"name": ..., "arguments": {...}}``; the action ``respond`` (its
  ``arguments.content``) is a message to the user; tool results come back as ``user`` messages opening with
  ``API output:`` (or ``Observation:``, or wrapped in ``<tool_response>`` tags). LangChain's ``Action: name`` / ``Action Input: {...}`` is read the same way;
- ``text``: calls written as text in one of the forms below, plain text to the user, tool results as user
  messages (a code-action harness writing Python-style calls, or one writing JSON objects).

Calls written as text are read in the JSON-in-text forms small models write (a bare call object, a
```` ```json ```` fence, ``<tool_call>`` tags, several in a row, after prose) and in the forms open models emit
when the server has no tool parser for them (the formats vLLM's tool parsers read): a call list after a control
token (``<|python_tag|>`` Llama 3.x, ``[TOOL_CALLS]`` Mistral, ``<|tool_call|>`` Granite), Llama 3.1's
``<function=name>{...}</function>``, and Python-style calls (``[get_order(order_id="#W1")]``, Llama 3.2/4
"pythonic"; or the same in a ```` ```python ```` fence): keyword arguments with literal values only, parsed with
:mod:`ast` (nothing is run), and only calls of known tools.

``native_turn`` turns a conversation and its candidate answer into the native shape, message for message (the
indexes stay those of the recorded conversation): a text action becomes an assistant message with
``tool_calls`` (ids ``text-<index>``, the thought is not text to the user), ``respond`` its content, and a
tool result sent as a user message a ``tool`` message answering that call. ``auto`` (the default) reads a
conversation that has no native calls or tool messages as ``react`` when one of its assistant messages (the
candidate included) is a ReAct action, as ``text`` when a call written otherwise is answered by a tool result
written as a user message.

Pure functions; ``split_text_calls`` is also what the proxy uses to move calls a model leaked into its text
to ``tool_calls`` (:mod:`proxy.upstream.textcalls`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from detector_service.contract.profile import Dialect, Profile

MAX_CHARS = 65_536  # longer texts are answers, not calls; they are left alone
RESPOND = "respond"  # the ReAct action that is a message to the user
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCED = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*", re.MULTILINE)
_ACTION_INPUT = re.compile(r"\A([A-Za-z_][\w.\-]*)[ \t]*\r?\n[ \t]*Action[ \t]+Input[ \t]*:[ \t]*(.*)\Z", re.DOTALL)
_RESULT = re.compile(r"\A\s*(API output|Observation|Tool (?:output|result)|Function (?:output|result))[ \t]*:[ \t]*")
# Hermes/Qwen-style templates without native tool messages hand results back in tags: the message is the block.
_RESULT_TAG = re.compile(r"\A\s*<tool_response>\s*(.*?)\s*</tool_response>\s*\Z", re.DOTALL)
_DECODER = json.JSONDecoder()
# Control tokens a model writes before its calls when no tool parser takes them out (vLLM: llama3_json, mistral,
# granite); removed where they open a line so the calls after them read as any other.
_MARKER = re.compile(r"^([ \t]*)(?:<\|python_tag\|>|\[TOOL_CALLS\]|<\|tool_call\|>)[ \t]*", re.MULTILINE)
_FUNCTION_TAG = re.compile(r"<function=([A-Za-z_][\w.\-]*)>\s*(\{.*?\})\s*</function>", re.DOTALL)
_PY_START = re.compile(r"\n[ \t]*(?=\[?[ \t]*[A-Za-z_][\w.]*\()")


def _call_of(value: Any, tools: Collection[str] | None) -> dict[str, Any] | None:
    """``{"name", "arguments"}`` of a call object naming one of ``tools`` (any name when None)."""
    if not isinstance(value, Mapping):
        return None
    if isinstance(value.get("function"), Mapping):  # {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    args = value.get("arguments", value.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, Mapping):
        return None
    if tools is not None and name not in tools:
        return None
    if set(value) - {"name", "arguments", "parameters", "type", "id"}:
        return None  # other keys: some other JSON that happens to have a name
    return {"name": name, "arguments": dict(args)}


def _calls_in(text: str, tools: Collection[str] | None) -> list[dict[str, Any]] | None:
    """The calls ``text`` consists of (JSON values separated by whitespace), or None."""
    calls: list[dict[str, Any]] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos == end:
            return calls or None
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call_of(item, tools)
            if call is None:
                return None
            calls.append(call)


def _python_calls(text: str, tools: Collection[str]) -> list[dict[str, Any]] | None:
    """Python-style calls of declared tools (one, or a list), keyword arguments with literal values; else None."""
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    calls: list[dict[str, Any]] = []
    for node in body.elts if isinstance(body, ast.List | ast.Tuple) else [body]:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if node.func.id not in tools:
            return None
        args: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            try:
                args[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return None
        try:
            orjson.dumps(args)
        except TypeError:
            return None  # a set, bytes or a complex number: no JSON arguments
        calls.append({"name": node.func.id, "arguments": args})
    return calls or None


def _any_calls(text: str, tools: Collection[str]) -> list[dict[str, Any]] | None:
    return _calls_in(text, tools) or _python_calls(text, tools)


def _function_tags(text: str, tools: Collection[str]) -> tuple[str, list[dict[str, Any]]] | None:
    """Llama 3.1's ``<function=name>{arguments}</function>`` blocks, with the text around them as prose."""
    found = list(_FUNCTION_TAG.finditer(text))
    if not found:
        return None
    calls: list[dict[str, Any]] = []
    for block in found:
        call = _call_of({"name": block.group(1), "arguments": block.group(2)}, tools)
        if call is None:
            return None
        calls.append(call)
    return _FUNCTION_TAG.sub("", text).strip(), calls


def _blocks(text: str, pattern: re.Pattern[str], tools: Collection[str]) -> tuple[str, list[dict[str, Any]]] | None:
    """Calls in every block ``pattern`` finds, with the text around the blocks as prose."""
    found = list(pattern.finditer(text))
    if not found:
        return None
    calls: list[dict[str, Any]] = []
    for block in found:
        inside = _any_calls(block.group(1), tools)
        if inside is None:
            return None
        calls.extend(inside)
    prose = pattern.sub("", text).strip()
    return prose, calls


def _trailing(text: str, tools: Collection[str]) -> tuple[str, list[dict[str, Any]]] | None:
    """Calls that make up the end of ``text``, starting at its beginning or at the start of a line."""
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*(?=[\[{])", text)]
    for start in starts:
        calls = _calls_in(text[start:], tools)
        if calls is not None:
            return text[:start].strip(), calls
    if "(" in text:
        for start in [0] + [m.end() for m in _PY_START.finditer(text)]:
            calls = _python_calls(text[start:], tools)
            if calls is not None:
                return text[:start].strip(), calls
    return None


def known_names(declared: Collection[str], profile: Profile) -> frozenset[str]:
    """The tool names calls written as text are read against: those the request declares and those of the profile's
    ``tools:`` (a text harness may declare none in its request)."""
    return frozenset(declared) | profile.tools.keys()


def split_text_calls(text: str, tools: Collection[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``(prose or None, calls)`` when ``text`` carries tool calls of the declared ``tools``; else None."""
    if not tools or not text or len(text) > MAX_CHARS or not any(o in text for o in ("{", "[", "(")):
        return None
    text = _MARKER.sub(r"\1", text)
    found = (
        _blocks(text, _TAGGED, tools)
        or _function_tags(text, tools)
        or _blocks(text, _FENCED, tools)
        or _trailing(text, tools)
    )
    if found is None:
        return None
    prose, calls = found
    return (prose or None), calls


@dataclass(frozen=True, slots=True)
class ReactAction:
    """A ReAct ``Action:``: the call (``None`` when what follows is no call object: the harness sends it to
    the user as it is) and the text after ``Action:``."""

    call: dict[str, Any] | None
    rest: str


@lru_cache(maxsize=8192)  # every later turn of a conversation carries the same messages again
def react_action(text: str) -> ReactAction | None:
    """The last ``Action:`` of a ReAct message, as the harness parses it; None when it has none."""
    if len(text) > MAX_CHARS:
        return None
    found = list(_ACTION.finditer(text))
    if not found:
        return None
    last = found[-1]
    rest = text[last.end() :].strip()
    fenced = _FENCED.fullmatch(rest)
    calls = _calls_in(fenced.group(1) if fenced else rest, None)
    if calls is not None and len(calls) == 1:
        return ReactAction(calls[0], rest)
    named = _ACTION_INPUT.match(rest)  # LangChain: "Action: name" then "Action Input: {...}"
    if named is not None:
        try:
            args = json.loads(named.group(2).strip() or "{}")
        except ValueError:
            args = None
        if isinstance(args, dict):
            return ReactAction({"name": named.group(1), "arguments": args}, rest)
    return ReactAction(None, rest)


def tool_result(text: str) -> str | None:
    """The tool output a user message carries (``API output: ...``, ``Observation: ...``, a message that is one
    ``<tool_response>`` block), or None for the user's own words."""
    opened = _RESULT.match(text)
    if opened:
        return text[opened.end() :]
    tagged = _RESULT_TAG.match(text)
    return tagged.group(1) if tagged else None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _said(call: dict[str, Any]) -> str:
    args = call["arguments"]
    said = args.get("content")
    if not isinstance(said, str):
        said = next((v for v in args.values() if isinstance(v, str)), "")
    return said


def text_calls(message: dict[str, Any], tools: Collection[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """What an assistant message without ``tool_calls`` does when its actions are text: ``(text to the user,
    calls)``, or None when it is plain text (said to the user as it is)."""
    if message.get("role") != "assistant" or message.get("tool_calls"):
        return None
    text = _text(message.get("content"))
    if not text:
        return None
    action = react_action(text)
    if action is not None:
        if action.call is None:
            return action.rest, []
        if action.call["name"] == RESPOND and RESPOND not in tools:
            return _said(action.call), []
        return None, [action.call]
    found = split_text_calls(text, tools)
    return None if found is None else (found[0], found[1])


def _is_native(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") in ("tool", "function") for m in messages)


def resolve(
    dialect: Dialect,
    messages: Sequence[dict[str, Any]],
    candidate: dict[str, Any] | None,
    tools: Collection[str],
) -> Dialect:
    """The dialect a conversation is written in: the declared one, or (``auto``) the one it shows."""
    if dialect is not Dialect.AUTO:
        return dialect
    seen = [*messages, candidate] if candidate is not None else messages
    if _is_native(seen):
        return Dialect.NATIVE
    found = Dialect.NATIVE
    for i, m in enumerate(seen):
        if m.get("role") != "assistant":
            continue
        text = _text(m.get("content"))
        action = react_action(text) if text else None
        if action is not None and action.call is not None:
            return Dialect.REACT
        answered = i + 1 < len(seen) and seen[i + 1].get("role") == "user"
        if answered and tool_result(_text(seen[i + 1].get("content"))) is not None and text_calls(m, tools):
            found = Dialect.TEXT  # calls written as text, answered as user messages, in no ReAct form (yet)
    return found


def native_message(message: dict[str, Any], at: int, tools: Collection[str]) -> dict[str, Any]:
    """An assistant message of a text-action conversation in the native shape (itself when it is plain text)."""
    found = text_calls(message, tools)
    if found is None:
        return message
    said, calls = found
    out = {k: v for k, v in message.items() if k not in ("content", "tool_calls")}
    out["content"] = said
    if calls:
        out["tool_calls"] = [
            {
                "id": f"text-{at}" if len(calls) == 1 else f"text-{at}-{k}",
                "type": "function",
                "function": {"name": c["name"], "arguments": orjson.dumps(c["arguments"]).decode()},
            }
            for k, c in enumerate(calls)
        ]
    return out


def native_messages(messages: Sequence[dict[str, Any]], tools: Collection[str]) -> list[dict[str, Any]]:
    """A text-action conversation in the native shape, message for message."""
    out: list[dict[str, Any]] = []
    waiting: dict[str, Any] | None = None  # the text call the next tool result answers
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant":
            native = native_message(m, i, tools)
            calls = native.get("tool_calls") if native is not m else None
            waiting = calls[0] if calls else None
            out.append(native)
            continue
        result = tool_result(_text(m.get("content"))) if role == "user" and waiting is not None else None
        if result is not None and waiting is not None:
            out.append(
                {"role": "tool", "tool_call_id": waiting["id"], "name": waiting["function"]["name"], "content": result}
            )
        else:
            out.append(m)
        waiting = None
    return out


def native_turn(
    dialect: Dialect,
    messages: Sequence[dict[str, Any]],
    candidate: dict[str, Any] | None,
    tools: Collection[str],
) -> tuple[Dialect, list[dict[str, Any]], dict[str, Any] | None]:
    """The conversation and its candidate answer as the detectors read them, and the dialect they were in."""
    found = resolve(dialect, messages, candidate, tools)
    if not found.text_actions:
        return found, list(messages), candidate
    native = native_messages(messages, tools)
    return found, native, None if candidate is None else native_message(candidate, len(messages), tools)


def react_text(name: str, arguments: Mapping[str, Any], thought: str) -> str:
    """An action written the way a ReAct harness reads it: ``Thought:``, then ``Action:`` and one JSON object."""
    action = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"Thought: {thought}\nAction:\n{action}"


def react_respond(text: str, thought: str) -> str:
    """A ReAct ``respond`` action: ``text`` to the user."""
    return react_text(RESPOND, {"content": text}, thought)
