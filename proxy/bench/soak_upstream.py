"""The model server of ``fama soak``: scripted answers with tool calls, paced like a small model, and faults.

The request's ``model`` picks the answer: ``soak:text``, ``soak:read`` (a look-up call), ``soak:write`` (a
cancellation call), ``soak:error-500`` (an OpenAI-shaped 500), ``soak:drop`` (a stream whose connection is cut
after a few chunks). Run: ``python -m proxy.bench.soak_upstream PORT``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from proxy.bench.canned_upstream import Receive, Scope, Send, lifespan, read_body, respond

CHUNK_DELAY_S = 0.01  # between stream chunks: a small model's token pace
ANSWER_DELAY_S = 0.05  # before a non-streamed answer
TEXT = ["Your ", "reservation ", "ABC123 ", "is ", "confirmed ", "for ", "May ", "3."]
CALLS = {
    "read": ("get_reservation_details", '{"reservation_id": "ABC123"}'),
    "write": ("cancel_reservation", '{"reservation_id": "ABC123"}'),
}


class UpstreamDrop(Exception):
    """Raised mid-stream on purpose: uvicorn cuts the connection."""


def _message(scenario: str) -> tuple[dict[str, Any], str]:
    if scenario in CALLS:
        name, arguments = CALLS[scenario]
        call = {"id": f"call_{scenario}", "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": "".join(TEXT)}, "stop"


def _completion(model: str, scenario: str) -> bytes:
    message, finish = _message(scenario)
    return orjson.dumps(
        {
            "id": "chatcmpl-soak",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48},
        }
    )


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    payload = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 0, "model": model}
    return b"data: " + orjson.dumps({**payload, "choices": [choice]}) + b"\n\n"


def _deltas(scenario: str) -> list[tuple[dict[str, Any], str | None]]:
    if scenario in CALLS:
        name, arguments = CALLS[scenario]
        header = {"index": 0, "id": f"call_{scenario}", "type": "function", "function": {"name": name, "arguments": ""}}
        parts = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
        return [
            ({"role": "assistant", "content": None}, None),
            ({"tool_calls": [header]}, None),
            *(({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, None) for p in parts),
            ({}, "tool_calls"),
        ]
    return [({"role": "assistant", "content": ""}, None), *(({"content": t}, None) for t in TEXT), ({}, "stop")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    raw = await read_body(receive)
    if scope["path"].endswith("/models"):
        listed = {"object": "list", "data": [{"id": "soak", "object": "model", "created": 0, "owned_by": "soak"}]}
        await respond(send, 200, orjson.dumps(listed))
        return
    if not scope["path"].endswith("/chat/completions"):
        await respond(send, 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
        return
    req = orjson.loads(raw) if raw else {}
    model = str(req.get("model", "soak:text"))
    scenario = model.partition(":")[2] or "text"
    if scenario == "error-500":
        error = {"message": "scripted upstream failure", "type": "server_error", "param": None, "code": None}
        await respond(send, 500, orjson.dumps({"error": error}))
        return
    if not req.get("stream"):
        await asyncio.sleep(ANSWER_DELAY_S)
        await respond(send, 200, _completion(model, scenario))
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i, (delta, finish) in enumerate(_deltas("text" if scenario == "drop" else scenario)):
        if scenario == "drop" and i == 3:
            raise UpstreamDrop("scripted connection drop")
        await send({"type": "http.response.body", "body": _chunk(model, delta, finish), "more_body": True})
        await asyncio.sleep(CHUNK_DELAY_S)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def main() -> None:
    import uvicorn

    port = int(sys.argv[1])
    # The scripted drops are the point, not news: uvicorn's traceback for each would drown the log.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="critical", access_log=False)


if __name__ == "__main__":
    main()
