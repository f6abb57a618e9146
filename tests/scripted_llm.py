"""A scripted OpenAI-compatible LLM endpoint for the judge and the LLM-backed agents, served over real HTTP.

Answers are chosen by the ``response_format`` schema name the caller asks for (``fama_judge``,
``fama_policy_rules``), so one server can play both roles. It records what it was asked, how many
requests were in flight at once, and can be made slow (``delay_s``) or answer garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.servers import serve_in_thread


class ScriptedLLM:
    def __init__(self) -> None:
        self.answers: dict[str, str] = {}  # schema name -> message content
        self.responder: Callable[[dict[str, Any]], str] | None = None  # request body -> content, overrides answers
        self.delay_s = 0.0
        self.status = 200
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.arrived = threading.Event()  # set by the first request (the server runs in another thread)
        self.in_flight = 0
        self.max_in_flight = 0

    def asked(self, schema: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if _schema_name(r) == schema]

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append(body)
            self.authorizations.append(request.headers.get("authorization"))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.arrived.set()
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
            if self.status != 200:
                error = {"message": "scripted failure", "type": "server_error", "param": None, "code": None}
                return JSONResponse({"error": error}, status_code=self.status)
            content = self.responder(body) if self.responder else self.answers.get(_schema_name(body), "{}")
            return JSONResponse(
                {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                    ],
                }
            )

        return app

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Serve on loopback; yields the ``/v1`` base URL."""
        with serve_in_thread(self.app()) as url:
            yield f"{url}/v1"


def _schema_name(body: dict[str, Any]) -> str:
    fmt = body.get("response_format") or {}
    return str((fmt.get("json_schema") or {}).get("name") or "")
