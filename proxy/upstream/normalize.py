"""Turn what vLLM, Ollama, llama.cpp server and TGI send into spec-valid OpenAI bodies.

Pure functions over parsed JSON dicts (no I/O). Quirks handled, by upstream:

- Ollama: role repeated in every delta; several tool calls on ``index`` 0 in one delta; tool-call turns
  finished with ``stop``; no ``logprobs``/``refusal`` in non-streaming choices; flat ``{"error": "..."}``.
- llama.cpp server: tool call ``id``/``type``/``name`` repeated in every delta (the SDK would concatenate
  ``"get_xget_x…"``); usage inside the last chunk that still has choices; ``{"error": {"code": 500}}``.
- TGI Messages API: empty chunk ``id``; role in every delta; ``tool_calls`` as an object instead of a
  list; ``arguments`` as a JSON object; ``eos_token`` finish reason; ``{"error": "...", "error_type": "..."}``.
- vLLM: numeric error ``code``; ``{"object": "error", ...}`` flat error bodies; empty ``tool_calls`` lists.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_FINISH_ALIASES = {
    "eos_token": "stop",
    "eos": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
    "max_tokens": "length",
    "max_length": "length",
    "model_length": "length",
    "tool_call": "tool_calls",
    "tool_use": "tool_calls",
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# TGI's error_type vocabulary, mapped onto OpenAI's; the original goes into ``code``.
_TGI_TYPES = {
    "validation": "invalid_request_error",
    "overloaded": "rate_limit_error",
    "generation": "server_error",
    "incomplete_generation": "server_error",
    "tokenizer": "invalid_request_error",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(value: object, has_tool_calls: bool) -> str | None:
    if value is None:
        return None
    reason = str(value)
    reason = _FINISH_ALIASES.get(reason, reason)
    if reason not in _FINISH_REASONS:
        reason = "stop"
    if has_tool_calls and reason == "stop":
        return "tool_calls"
    return reason


def arguments_text(value: object) -> str:
    """Tool-call arguments as the JSON string the spec requires (Ollama/TGI may send an object)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return orjson.dumps(value).decode()


def _code(value: object) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def default_error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_from_upstream(status: int, payload: object, fallback: str) -> dict[str, Any]:
    """The upstream's error payload (already parsed, or None) as OpenAI's ``{"error": {...}}``."""
    type_ = default_error_type(status)
    message, param, code = fallback, None, None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):  # OpenAI, vLLM >= 0.11, llama.cpp, Ollama's OpenAI layer
            payload = err
            err = None
        if isinstance(err, str):  # TGI and native Ollama: flat strings
            message = err or fallback
            vendor_type = payload.get("error_type")
            if isinstance(vendor_type, str):
                type_ = _TGI_TYPES.get(vendor_type, type_)
                code = vendor_type
        else:  # an OpenAI-like object, possibly vLLM's flat {"object": "error", ...}
            if isinstance(payload.get("message"), str) and payload["message"]:
                message = payload["message"]
            elif isinstance(payload.get("detail"), str):
                message = payload["detail"]
            if isinstance(payload.get("type"), str) and payload["type"]:
                type_ = payload["type"]
            param = payload.get("param") if isinstance(payload.get("param"), str) else None
            code = _code(payload.get("code"))
    elif isinstance(payload, str) and payload.strip():
        message = payload.strip()[:2000]
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def is_error_event(payload: object) -> bool:
    return isinstance(payload, dict) and bool(payload.get("error")) and "choices" not in payload


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    call.pop("index", None)
    if not call.get("id"):
        call["id"] = new_id("call")
    call["type"] = call.get("type") or "function"
    function = call.get("function")
    if isinstance(function, dict):
        function["arguments"] = arguments_text(function.get("arguments"))
        function.setdefault("name", "")
    return call


def chat_completion(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Normalize a non-streaming chat completion in place and return it."""
    if not body.get("id"):
        body["id"] = new_id("chatcmpl")
    body["object"] = "chat.completion"
    if not isinstance(body.get("created"), int):
        body["created"] = int(time.time())
    if not body.get("model"):
        body["model"] = model
    choices = body.get("choices")
    if not isinstance(choices, list):
        body["choices"] = choices = []
    for i, choice in enumerate(choices):
        choice.setdefault("index", i)
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if not isinstance(message, dict):
            choice["message"] = message = {}
        message["role"] = message.get("role") or "assistant"
        message.setdefault("content", None)
        message.setdefault("refusal", None)
        calls = message.get("tool_calls")
        if isinstance(calls, dict):
            calls = [calls]
        if calls:
            message["tool_calls"] = [_tool_call(c) for c in calls if isinstance(c, dict)]
            if message["content"] == "":  # Ollama/llama.cpp; OpenAI sends null next to tool calls
                message["content"] = None
        else:
            message.pop("tool_calls", None)
        choice["finish_reason"] = finish_reason(choice.get("finish_reason"), bool(message.get("tool_calls"))) or "stop"
    return body


def model_list(body: object) -> dict[str, Any]:
    """``GET /models`` as a list (TGI answers a single model object)."""
    if isinstance(body, dict) and body.get("object") == "model":
        body = {"object": "list", "data": [body]}
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return {"object": "list", "data": []}
    body["object"] = "list"
    for entry in body["data"]:
        if isinstance(entry, dict):
            model(entry)
    return body


def model(entry: dict[str, Any]) -> dict[str, Any]:
    entry["object"] = "model"
    if not isinstance(entry.get("created"), int):
        entry["created"] = 0
    if not isinstance(entry.get("owned_by"), str):
        entry["owned_by"] = "upstream"
    return entry


class ChunkNormalizer:
    """Per-stream state that rewrites each upstream chunk into a spec-valid one.

    One instance per streamed response. ``chunk()`` returns the chunk to send, or None to drop it.
    Usage is held back and emitted once, at the end, as the ``choices: []`` chunk the SDK expects
    (see :meth:`usage_chunk`).
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self._id = ""
        self._created = 0
        self._model = model
        self._fingerprint: object = None
        self._role_sent: set[int] = set()
        # per choice: tool-call id -> our index, upstream index -> our index of the call in progress
        self._ids: dict[int, dict[str, int]] = {}
        self._open: dict[int, dict[int, int]] = {}
        self.tool_calls_seen: set[int] = set()
        self.changed = False  # whether the last chunk() altered its chunk

    def _envelope(self, chunk: dict[str, Any]) -> None:
        if not self._id:
            upstream_id = chunk.get("id")
            self._id = upstream_id if isinstance(upstream_id, str) and upstream_id else new_id("chatcmpl")
            created = chunk.get("created")
            self._created = created if isinstance(created, int) else int(time.time())
            upstream_model = chunk.get("model")
            if isinstance(upstream_model, str) and upstream_model:
                self._model = upstream_model
            self._fingerprint = chunk.get("system_fingerprint")
        created = chunk.get("created")
        if not (
            chunk.get("id") == self._id
            and chunk.get("object") == "chat.completion.chunk"
            and type(created) is int
            and created == self._created
            and chunk.get("model") == self._model
        ):
            self.changed = True
            chunk["id"] = self._id
            chunk["object"] = "chat.completion.chunk"
            chunk["created"] = self._created
            chunk["model"] = self._model

    def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk to send (changed in place; ``changed`` tells whether anything was), or None."""
        self.changed = "usage" in chunk
        usage = chunk.pop("usage", None)
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return None  # a usage-only chunk (held back) or an empty keep-alive
        self._envelope(chunk)
        for position, choice in enumerate(choices):
            self._choice(choice, position)
        return chunk

    def _choice(self, choice: dict[str, Any], position: int) -> None:
        index = choice.get("index")
        if not isinstance(index, int):
            choice["index"] = index = position
            self.changed = True
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            choice["delta"] = delta = {}
            self.changed = True
        if delta.get("content") == "":
            # Carries nothing; as null, a tool-call turn aggregates to ``content: null`` as with OpenAI.
            delta["content"] = None
            self.changed = True
        if index in self._role_sent:
            if "role" in delta:
                del delta["role"]
                self.changed = True
        else:
            if delta.get("role") != "assistant":
                delta["role"] = "assistant"
                self.changed = True
            self._role_sent.add(index)
        calls = delta.get("tool_calls")
        if isinstance(calls, dict):
            calls = [calls]
        if calls:
            delta["tool_calls"] = [self._tool_delta(index, c) for c in calls if isinstance(c, dict)]
            self.tool_calls_seen.add(index)
            self.changed = True
        elif "tool_calls" in delta:
            del delta["tool_calls"]
            self.changed = True
        reason = finish_reason(choice.get("finish_reason"), index in self.tool_calls_seen)
        if "finish_reason" not in choice or choice["finish_reason"] != reason:
            choice["finish_reason"] = reason
            self.changed = True

    def _tool_delta(self, choice: int, call: dict[str, Any]) -> dict[str, Any]:
        ids = self._ids.setdefault(choice, {})
        open_calls = self._open.setdefault(choice, {})
        upstream_index = call.get("index")
        if not isinstance(upstream_index, int):
            upstream_index = 0
        call_id = call.get("id") or None
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        if "arguments" in function:
            function["arguments"] = arguments_text(function["arguments"])
        if call_id in ids:
            ours = ids[call_id]
        elif call_id is None and upstream_index in open_calls:
            ours = open_calls[upstream_index]
        else:  # a new call: the next index, with its header (id, type, name) sent once
            ours = len(ids)
            call_id = call_id or new_id("call")
            ids[call_id] = ours
            open_calls[upstream_index] = ours
            header: dict[str, Any] = {"name": function.get("name") or ""}
            if "arguments" in function:
                header["arguments"] = function["arguments"]
            return {"index": ours, "id": call_id, "type": "function", "function": header}
        out: dict[str, Any] = {"index": ours}
        if "arguments" in function:
            out["function"] = {"arguments": function["arguments"]}
        return out

    def usage_chunk(self) -> dict[str, Any] | None:
        """The final ``choices: []`` chunk, when the client asked for ``include_usage``.

        When the upstream reported no usage anywhere in the stream (llama-cpp-python never does), the
        chunk is still sent, with ``"usage": null``: the SDK's contract (a last chunk with empty
        choices) holds, and no token counts are invented.
        """
        if not self.include_usage:
            return None
        if not self._id:
            self._envelope({})
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": self.usage,
        }
        if self._fingerprint is not None:
            chunk["system_fingerprint"] = self._fingerprint
        return chunk


def adapt_for_upstream(body: dict[str, Any]) -> dict[str, Any]:
    """Request-side quirks. llama-cpp-python answers 500 to an assistant message whose ``content`` is
    null next to ``tool_calls``; an empty string means the same to every server."""
    for message in body["messages"]:
        if message.get("role") == "assistant" and message.get("tool_calls") and message.get("content") is None:
            message["content"] = ""
    # llama-cpp-python ignores max_completion_tokens (the newer name) and generates until the context is full.
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body["max_tokens"] = body["max_completion_tokens"]
    return body
