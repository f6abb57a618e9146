"""A minimal OpenAI-compatible upstream for ``fama bench``: canned answers, no framework, no model.

It answers as fast as the machine allows so that a benchmark measures what the proxy adds, not a model.
Run: ``python -m proxy.bench.canned_upstream PORT``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STREAM_CHUNKS = 20


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}
    finish = "stop"
    if body.get("tools") and body.get("tool_choice") not in (None, "none", "auto"):
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_bench_1",
                    "type": "function",
                    "function": {"name": "get_reservation_details", "arguments": '{"reservation_id": "ABC123"}'},
                }
            ],
        }
        finish = "tool_calls"
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "bench")),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
    }


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        msg = await receive()
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(parts)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    path = scope["path"]
    raw = await read_body(receive)
    if path.endswith("/models"):
        body = orjson.dumps(
            {"object": "list", "data": [{"id": "bench", "object": "model", "created": 0, "owned_by": "bench"}]}
        )
        await respond(send, 200, body)
        return
    if not path.endswith("/chat/completions"):
        await respond(send, 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
        return
    req = orjson.loads(raw) if raw else {}
    if not req.get("stream"):
        await respond(send, 200, orjson.dumps(_completion(req)))
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": _chunk({"role": "assistant", "content": ""}), "more_body": True})
    for i in range(STREAM_CHUNKS):
        await send({"type": "http.response.body", "body": _chunk({"content": f"tok{i} "}), "more_body": True})
    await send({"type": "http.response.body", "body": _chunk({}, "stop"), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    port = int(sys.argv[1])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
