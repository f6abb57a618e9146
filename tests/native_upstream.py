"""A scripted model server that serves the Responses API itself (as vLLM does), for the proxy's native path.

``NativeModel(reply)`` serves ``POST /v1/responses`` (JSON or an SSE stream of Responses events),
``GET|DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` and ``GET /v1/responses/{id}/input_items``
on a real uvicorn (``serve_in_thread(model.app)``). ``reply(body)`` returns ``{"text": ..., "calls": [(name,
arguments), ...]}`` for a Responses request body (``{"fail": True}``: a stream that ends in ``response.failed``). Every request is kept in :attr:`NativeModel.requests`
(method, path with query, parsed body).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Reply = Callable[[dict[str, Any]], dict[str, Any]]
USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 15,
}


def feedback_in(body: dict[str, Any]) -> str | None:
    """The proxy's corrective feedback, when this request is a retry (the last input item)."""
    items = body.get("input")
    last = items[-1] if isinstance(items, list) and items else {}
    content = last.get("content")
    if last.get("role") == "system" and isinstance(content, str) and content.startswith("[FAMA feedback]"):
        return content
    return None


class NativeModel:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[str, str, Any]] = []
        self.stored: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/v1/responses", self.create, methods=["POST"]),
                Route("/v1/responses/{rid}", self.retrieve, methods=["GET", "DELETE"]),
                Route("/v1/responses/{rid}/cancel", self.cancel, methods=["POST"]),
                Route("/v1/responses/{rid}/input_items", self.input_items, methods=["GET"]),
            ]
        )

    def _keep(self, request: Request, body: Any) -> None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        with self._lock:
            self.requests.append((request.method, path, body))

    def creates(self) -> list[dict[str, Any]]:
        """The bodies of every create (the proxy's probe, an empty object, included)."""
        with self._lock:
            return [b for m, p, b in self.requests if m == "POST" and p == "/v1/responses"]

    async def create(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self._keep(request, body)
        if "model" not in body:
            return JSONResponse({"error": {"message": "model is required", "type": "invalid_request_error"}}, 400)
        answer = self.reply(body)
        rid = f"resp_native_{next(self._ids)}"
        output: list[dict[str, Any]] = []
        if answer.get("text"):
            part = {"type": "output_text", "text": answer["text"], "annotations": []}
            output.append(
                {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed", "content": [part]}
            )
        for i, (name, arguments) in enumerate(answer.get("calls") or ()):
            output.append(
                {
                    "id": f"fc_{rid}_{i}",
                    "type": "function_call",
                    "call_id": f"call_{i}",
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                }
            )
        response = {
            "id": rid,
            "object": "response",
            "created_at": 1_760_000_000,
            "status": "completed",
            "model": body["model"],
            "output": output,
            "usage": USAGE,
            "tools": body.get("tools") or [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            **({"fail": True} if answer.get("fail") else {}),
        }
        self.stored[rid] = response
        if not body.get("stream"):
            return JSONResponse(response)
        return StreamingResponse(self._events(response), media_type="text/event-stream")

    async def _events(self, response: dict[str, Any]) -> AsyncIterator[bytes]:
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            data = json.dumps({"type": kind, **fields, "sequence_number": next(seq)})
            return f"event: {kind}\ndata: {data}\n\n".encode()

        skeleton = {**response, "status": "in_progress", "output": []}
        yield event("response.created", response=skeleton)
        if response.get("fail"):
            failed = {**skeleton, "status": "failed", "error": {"code": "server_error", "message": "the GPU fell over"}}
            yield event("response.failed", response=failed)
            return
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                yield event("response.output_item.added", output_index=index, item={**item, "content": []})
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                )
                for piece in (text[i : i + 6] for i in range(0, len(text), 6)):
                    yield event(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=piece,
                    )
                yield event("response.output_item.done", output_index=index, item=item)
            else:
                yield event("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
                yield event("response.output_item.done", output_index=index, item=item)
        yield event("response.completed", response=response)

    async def retrieve(self, request: Request) -> Response:
        self._keep(request, None)
        rid = request.path_params["rid"]
        if rid not in self.stored:
            return JSONResponse({"error": {"message": f"no response {rid}", "type": "invalid_request_error"}}, 404)
        if request.method == "DELETE":
            del self.stored[rid]
            return JSONResponse({"id": rid, "object": "response", "deleted": True})
        return JSONResponse(self.stored[rid])

    async def cancel(self, request: Request) -> Response:
        self._keep(request, None)
        rid = request.path_params["rid"]
        return JSONResponse({**self.stored[rid], "status": "cancelled"})

    async def input_items(self, request: Request) -> Response:
        self._keep(request, None)
        return JSONResponse({"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False})
