"""Tool calls that a model wrote into its text instead of the tool-calling channel.

Small open models served without a matching tool parser often answer a tool-enabled request with the
call spelled out as text: a bare ``{"name": ..., "arguments": {...}}`` object, the same inside a
```` ```json ```` fence or Hermes-style ``<tool_call>`` tags, several of them one after another, sometimes
after a sentence of prose; or in a model's own format when the server runs no parser for it (``<|python_tag|>``,
``[TOOL_CALLS]``, ``<function=name>``, Python-style ``[name(arg="v")]``). The client then shows JSON to the user and nothing runs. This module turns such
text back into ``tool_calls``, and only when it is unambiguous: every object must name a tool the request
declared and carry object arguments; anything else leaves the message as it was. Prose before the calls
stays as the message's content.

The parsing itself is shared with the detectors (:mod:`detector_service.contract.textactions`, which also
reads a ReAct harness's ``Action:`` text). Pure functions; ``chat.py`` applies them to complete responses, and to streams from the point where the
content, or a later line of it, opens like a call (``line_opens_call``), so text before that point is
never held back.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Mapping
from typing import Any

import orjson

from detector_service.contract.textactions import MAX_CHARS, react_action, split_text_calls

__all__ = [
    "MAX_CHARS",
    "declared_tools",
    "leaked_calls",
    "line_opens_call",
    "repair_message",
    "split_text_calls",
    "tool_call_entries",
]


def leaked_calls(text: str, tools: Collection[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``split_text_calls``, except for a ReAct ``Action:``: its harness reads the action from the text itself,
    so the client gets that text as the model wrote it."""
    action = react_action(text) if "Action" in text else None
    if action is not None and action.call is not None:
        return None
    return split_text_calls(text, tools)


# What opens a call written as text: a JSON object or a list of them, a fence, a tag or a model's control token
# before calls, a list of Python-style calls (``[get_order(order_id="#W1")]``).
_LINE_OPENERS = ("{", "[", "```", "<tool_call>", "<|python_tag|>", "<|tool_call|>", "<function=", "[TOOL_CALLS]")
_PY_LIST = re.compile(r"\[[ \t]*[A-Za-z_][\w.]*[ \t]*\(")
_PY_LIST_SO_FAR = re.compile(r"\[[ \t]*[A-Za-z_][\w.]*[ \t]*\Z")


def line_opens_call(line: str) -> bool | None:
    """Whether a reply, or a line of it, starting with ``line`` (leading whitespace ignored) may start calls:
    True, False, or None while too short to tell."""
    head = line.lstrip()
    if not head:
        return None
    if head.startswith("["):  # a list of calls, not "[1] HAT170" or a markdown link
        if head.startswith("[TOOL_CALLS]"):
            return True
        rest = head[1:].lstrip()
        if not rest:
            return None
        if rest.startswith("{") or _PY_LIST.match(head):
            return True
        return None if _PY_LIST_SO_FAR.match(head) or "[TOOL_CALLS]".startswith(head) else False
    if head.startswith(_LINE_OPENERS):
        return True
    return None if any(o.startswith(head) for o in _LINE_OPENERS) else False


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
    found = leaked_calls(content, tools)
    if found is None:
        return False
    prose, calls = found
    message["content"] = prose
    message["tool_calls"] = tool_call_entries(calls)
    return True
