"""Responses API <-> chat completions, as pure functions over parsed JSON (no I/O).

Request side: ``instructions``, ``input`` items (messages, ``function_call``, ``function_call_output``; reasoning
items are dropped), flat function ``tools``, ``tool_choice`` and ``text.format`` become a chat body. Answer side:
an assistant chat message becomes output items (one ``message`` item with its ``output_text``, then one
``function_call`` item per tool call), and chat usage becomes Responses usage. Anything a chat-completions model
server cannot do (built-in tools such as web search, item references) is a 400 naming the parameter.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.errors import InvalidRequest

# Request fields copied to the chat body under their chat names; everything else the chat API lacks is dropped.
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_output_tokens": "max_tokens",
    "parallel_tool_calls": "parallel_tool_calls",
    "user": "user",
    "top_logprobs": "top_logprobs",
    "seed": "seed",
    "stop": "stop",
}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "refusal")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"'{param}' must be an object", param, "invalid_type")
    return value


def _string(obj: Mapping[str, Any], key: str, param: str, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(f"'{param}.{key}' must be a string", f"{param}.{key}", "invalid_type")
    return value


# -- request: input items -------------------------------------------------------------------------------


def input_items(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """``input`` as a list of items, each with an ``id`` and message content as a list of parts (the form the
    input-items listing gives back). A string is one user message."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad(f"'{param}' must be a string or an array of input items", param, "invalid_type")
    return [_item(item, f"{param}[{i}]") for i, item in enumerate(value)]


def _item(raw: Any, param: str) -> dict[str, Any]:
    item = dict(_object(raw, param))
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = _string(item, "role", param)
        if role not in ("user", "assistant", "system", "developer"):
            raise _bad(f"'{param}.role' must be one of user, assistant, system, developer", f"{param}.role")
        content = item.get("content")
        part = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            text_part: dict[str, Any] = {"type": part, "text": content}
            if part == "output_text":
                text_part["annotations"] = []
            content = [text_part]
        if not isinstance(content, list):
            raise _bad(f"'{param}.content' must be a string or an array of content parts", f"{param}.content")
        content = [dict(_object(p, f"{param}.content[{j}]")) for j, p in enumerate(content)]
        for p in content:
            if p.get("type") == "output_text":
                p.setdefault("annotations", [])
        prefix = "msg"
        item.update(type="message", content=content)
        item.setdefault("status", "completed")
    elif kind == "function_call":
        _string(item, "call_id", param)
        _string(item, "name", param)
        _string(item, "arguments", param)
        prefix = "fc"
        item.setdefault("status", "completed")
    elif kind == "function_call_output":
        _string(item, "call_id", param)
        if not isinstance(item.get("output"), str | list):
            raise _bad(f"'{param}.output' must be a string or an array", f"{param}.output", "invalid_type")
        prefix = "fco"
        item.setdefault("status", "completed")
    elif kind == "reasoning":
        prefix = "rs"
    else:
        raise _bad(
            f"input items of type '{kind}' need a model server that serves the Responses API itself; "
            "this one speaks chat completions (messages, function_call and function_call_output items work)",
            f"{param}.type",
            "unsupported_value",
        )
    if not isinstance(item.get("id"), str):
        item["id"] = new_id(prefix)
    return item


def _text(parts: Iterable[Any]) -> str:
    return "".join(str(p.get("text") or p.get("refusal") or "") for p in parts if p.get("type") in _TEXT_PARTS)


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts as one string (every chat server takes that); with images, chat content parts."""
    if all(p.get("type") in _TEXT_PARTS for p in parts):
        return _text(parts)
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.get("type") in _TEXT_PARTS:
            out.append({"type": "text", "text": str(p.get("text") or "")})
        elif p.get("type") == "input_image" and p.get("image_url"):
            out.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p.get("detail", "auto")}})
        else:
            raise _bad(f"content parts of type '{p.get('type')}' are not supported on chat completions", "input")
    return out


def chat_messages(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized items (see :func:`input_items`, or output items) as chat messages. Consecutive function calls
    become one assistant message with several ``tool_calls``, joined to the assistant text before them."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = item["role"]
            parts = item["content"]
            content: Any = _text(parts) if role != "user" else _user_content(parts)
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last.get("content") or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            text = output if isinstance(output, str) else _text(p for p in output if isinstance(p, dict))
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    return messages


# -- request: tools, tool_choice, text.format ------------------------------------------------------------


def chat_tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("'tools' must be an array of tools", "tools", "invalid_type")
    tools: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        tool = _object(raw, f"tools[{i}]")
        if tool.get("type") != "function":
            raise _bad(
                f"tools of type '{tool.get('type')}' need a model server that serves the Responses API itself; "
                "this one speaks chat completions (function tools work)",
                f"tools[{i}].type",
                "unsupported_value",
            )
        name = _string(tool, "name", f"tools[{i}]")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise _bad(f"'tools[{i}].parameters' must be an object (a JSON Schema)", f"tools[{i}].parameters")
        tools.append({"type": "function", "function": function})
    return tools


def chat_tool_choice(value: Any) -> str | dict[str, Any]:
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        return str(value.get("mode") or "auto")  # the chat API has no allowed subset; the mode is kept
    raise _bad("'tool_choice' must be auto, none, required or a function", "tool_choice")


def chat_response_format(text: Any) -> dict[str, Any] | None:
    fmt = _object(text, "text").get("format")
    if fmt is None:
        return None
    fmt = _object(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("'text.format.type' must be text, json_object or json_schema", "text.format.type")


def chat_body(request: Mapping[str, Any], history: list[dict[str, Any]], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request for a Responses request: ``instructions`` first, then the conversation so far (of the
    ``previous_response_id`` chain, whose instructions are not carried over), then this request's input."""
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("instructions"), str) and request["instructions"]:
        messages.append({"role": "system", "content": request["instructions"]})
    messages.extend(history)
    messages.extend(chat_messages(items))
    body: dict[str, Any] = {"model": request["model"], "messages": messages}
    for key, chat_key in _SAMPLING.items():
        if request.get(key) is not None:
            body[chat_key] = request[key]
    if request.get("tools"):
        body["tools"] = chat_tools(request["tools"])
    if request.get("tool_choice") is not None:
        body["tool_choice"] = chat_tool_choice(request["tool_choice"])
    if request.get("text") is not None:
        fmt = chat_response_format(request["text"])
        if fmt is not None:
            body["response_format"] = fmt
    if request.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# -- answer side -----------------------------------------------------------------------------------------


def message_item(text: str, item_id: str, status: str = "completed", kind: str = "output_text") -> dict[str, Any]:
    """An assistant message item with one content part: ``output_text``, or ``refusal`` (the model declined)."""
    part: dict[str, Any] = (
        {"type": "refusal", "refusal": text}
        if kind == "refusal"
        else {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    )
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def function_call_item(call: Mapping[str, Any], item_id: str, status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": str(call.get("id") or item_id),
        "name": str(fn.get("name") or ""),
        "arguments": str(fn.get("arguments") or ""),
        "status": status,
    }


def output_items(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An assistant chat message as Responses output items."""
    items: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str) and content:
        items.append(message_item(content, new_id("msg")))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        items.append(message_item(refusal, new_id("msg"), kind="refusal"))
    for call in message.get("tool_calls") or ():
        items.append(function_call_item(call, new_id("fc")))
    return items


def usage(chat_usage: object) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }


def response_object(
    request: Mapping[str, Any],
    response_id: str,
    created_at: int,
    *,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    chat_usage: object = None,
    finish_reason: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """The Response object for ``request``, echoing its parameters as the API does."""
    incomplete = status == "completed" and finish_reason == "length"
    text = request.get("text") if isinstance(request.get("text"), dict) else None
    given: dict[str, Any] = {
        k: request[k] for k in ("user", "safety_identifier", "prompt_cache_key") if isinstance(request.get(k), str)
    }
    if (counted := usage(chat_usage)) is not None:
        given["usage"] = counted  # the spec has no null usage: absent until known
    return {
        **given,
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "incomplete" if incomplete else status,
        "completed_at": completed_at if status == "completed" and not incomplete else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request["model"],
        "output": output or [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": text if text is not None and text.get("format") else {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": [{"strict": None, **t} for t in request.get("tools") or ()],
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation") or "disabled",
        "metadata": request.get("metadata") or {},
        "background": False,
        "service_tier": "default",
    }
