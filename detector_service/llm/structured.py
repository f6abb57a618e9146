"""JSON answers constrained by a JSON Schema, from any OpenAI-compatible server.

Servers take the schema in different ways. OpenAI, vLLM and Ollama's OpenAI API accept
``response_format: {"type": "json_schema", ...}``. llama-cpp-python's server refuses it with an error
naming the types it does take ("'text' or 'json_object'") and constrains the answer with a grammar when
given ``{"type": "json_object", "schema": ...}``. A ``StructuredCaller`` asks with ``json_schema`` first;
after a refusal of that kind it switches to ``json_object`` + schema for good, so each later call costs
one request. Grammar-constrained answers keep the schema's shape but not numeric bounds, so callers
still validate what comes back.
"""

from __future__ import annotations

from typing import Any, TypeVar

import openai
from openai import AsyncOpenAI
from pydantic import BaseModel, ValidationError

AnswerT = TypeVar("AnswerT", bound=BaseModel)

# Words of the errors servers give for a response_format type they do not know.
_REFUSAL_WORDS = ("json_object", "json_schema", "response_format")


def refuses_json_schema(exc: openai.APIStatusError) -> bool:
    message = str(exc.message).lower()
    return exc.status_code in (400, 422, 500) and any(word in message for word in _REFUSAL_WORDS)


class StructuredCaller:
    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self.client = client
        self.model = model
        self.schema_as_json_object = False  # set once the server refused json_schema

    async def complete(
        self, messages: list[Any], schema: dict[str, Any], name: str, request_timeout_s: float
    ) -> str | None:
        """The answer's text. Raises the client's errors (``openai.APIError`` and subclasses) unchanged."""
        if not self.schema_as_json_object:
            fmt: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": name, "strict": True, "schema": schema},
            }
            try:
                return await self._create(messages, fmt, request_timeout_s)
            except openai.APIStatusError as exc:
                if not refuses_json_schema(exc):
                    raise
                self.schema_as_json_object = True
        return await self._create(messages, {"type": "json_object", "schema": schema}, request_timeout_s)

    async def answer(
        self,
        messages: list[Any],
        schema: dict[str, Any],
        name: str,
        model: type[AnswerT],
        request_timeout_s: float,
        error: type[Exception],
        what: str,
    ) -> AnswerT:
        """The answer validated as ``model``; a timeout, a failed request or an answer off the schema raise
        ``error`` with a message that starts with ``what`` (e.g. "judge")."""
        try:
            content = await self.complete(messages, schema, name, request_timeout_s)
        except openai.APITimeoutError as exc:
            raise error(f"{what} timed out after {request_timeout_s}s") from exc
        except openai.APIError as exc:
            raise error(f"{what} request failed: {exc}") from exc
        try:
            return model.model_validate_json(content or "")
        except ValidationError as exc:
            raise error(f"{what} answer does not match the schema: {exc.errors()[:1]}") from exc

    async def _create(self, messages: list[Any], fmt: Any, request_timeout_s: float) -> str | None:
        response = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            temperature=0,
            response_format=fmt,  # json_object + schema is a server extension the SDK's types do not name
            timeout=request_timeout_s,
        )
        return response.choices[0].message.content if response.choices else None
