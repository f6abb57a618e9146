"""Tool calls that a model wrote into its text instead of the tool-calling channel.

Small open models served without a matching tool parser often answer a tool-enabled request with the
call spelled out as text: a bare ``{"name": ..., "arguments": {...}}`` object, the same inside a
```` ```json ```` fence or Hermes-style ``<tool_call>`` tags, several of them one after another, sometimes
after a sentence of prose. The client then shows JSON to the user and nothing runs. This module turns such
text back into ``tool_calls``, and only when it is unambiguous: every object must name a tool the request
declared and carry object arguments; anything else leaves the message as it was. Prose before the calls
stays as the message's content.

Pure functions; ``chat.py`` applies them to complete responses, and to streams from the point where the
content, or a later line of it, opens like a call (``line_opens_call``), so text before that point is
never held back.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Mapping
from typing import Any

import orjson

MAX_CHARS = 65_536  # longer texts are answers, not calls; they are left alone
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCED = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


# What opens a call written as text: a JSON object or a list of them, a fence, a Hermes-style tag.
_LINE_OPENERS = ("{", "[", "```", "<tool_call>")


def line_opens_call(line: str) -> bool | None:
    """Whether a reply, or a line of it, starting with ``line`` (leading whitespace ignored) may start calls:
    True, False, or None while too short to tell."""
    head = line.lstrip()
    if not head:
        return None
    if head.startswith("["):  # a list of calls, not "[1] HAT170" or a markdown link
        rest = head[1:].lstrip()
        return rest.startswith("{") if rest else None
    if head.startswith(_LINE_OPENERS):
        return True
    return None if any(o.startswith(head) for o in _LINE_OPENERS) else False


def _call_of(value: Any, tools: Collection[str]) -> dict[str, Any] | None:
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
    if not isinstance(name, str) or name not in tools or not isinstance(args, Mapping):
        return None
    if set(value) - {"name", "arguments", "parameters", "type", "id"}:
        return None  # other keys: some other JSON that happens to have a name
    return {"name": name, "arguments": dict(args)}


def _calls_in(text: str, tools: Collection[str]) -> list[dict[str, Any]] | None:
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


def _blocks(text: str, pattern: re.Pattern[str], tools: Collection[str]) -> tuple[str, list[dict[str, Any]]] | None:
    """Calls in every block ``pattern`` finds, with the text around the blocks as prose."""
    found = list(pattern.finditer(text))
    if not found:
        return None
    calls: list[dict[str, Any]] = []
    for block in found:
        inside = _calls_in(block.group(1), tools)
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
    return None


def split_text_calls(text: str, tools: Collection[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``(prose or None, calls)`` when ``text`` carries tool calls of the declared ``tools``; else None."""
    if not tools or not text or len(text) > MAX_CHARS or not any(o in text for o in ("{", "[")):
        return None
    found = _blocks(text, _TAGGED, tools) or _blocks(text, _FENCED, tools) or _trailing(text, tools)
    if found is None:
        return None
    prose, calls = found
    return (prose or None), calls


def tool_call_entries(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` entries (fresh ids, arguments as JSON text) for parsed calls."""
    return [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": c["name"], "arguments": orjson.dumps(c["arguments"]).decode()},
        }
        for c in calls
    ]


def declared_tools(body: Mapping[str, Any]) -> frozenset[str]:
    """Function names the request declares, unless it forbids tool calls (``tool_choice: none``) or asks for a
    JSON answer (``response_format`` ``json_object`` / ``json_schema``: JSON text is then the answer itself)."""
    fmt = body.get("response_format")
    if body.get("tool_choice") == "none" or (isinstance(fmt, Mapping) and fmt.get("type") != "text"):
        return frozenset()
    names = set()
    for tool in body.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return frozenset(names)


def repair_message(message: dict[str, Any], tools: Collection[str]) -> bool:
    """Move calls written in ``message["content"]`` into ``tool_calls``, in place. True if it did."""
    content = message.get("content")
    if message.get("tool_calls") or not isinstance(content, str):
        return False
    found = split_text_calls(content, tools)
    if found is None:
        return False
    prose, calls = found
    message["content"] = prose
    message["tool_calls"] = tool_call_entries(calls)
    return True
