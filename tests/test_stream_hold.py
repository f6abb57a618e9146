"""How long ToolTextChunks holds a streamed reply: only from where its text opens like a call.

The upstream here is an async generator that records how many pieces it has handed out when each chunk
reaches the consumer, so "streams at once" is checked by order, not by timing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from proxy.upstream.chunks import ToolTextChunks
from proxy.upstream.normalize import ChunkNormalizer

TOOLS = frozenset({"get_reservation_details"})
CALL = '{"name": "get_reservation_details", "arguments": {"reservation_id": "ZFA04Y"}}'


def _pieces(text: str, size: int = 6) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def _frames(pieces: list[str], handed: list[int]) -> AsyncGenerator[tuple[object, bytes], None]:
    for i, piece in enumerate(["", *pieces]):
        delta: dict[str, Any] = {"content": piece} if i else {"role": "assistant", "content": ""}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
        handed.append(i)
        yield chunk, orjson.dumps(chunk)
    done = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    done["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    handed.append(len(pieces) + 1)
    yield done, orjson.dumps(done)


def _consume(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(pieces handed out by the upstream when the chunk arrived, chunk) for every chunk of the reply."""

    async def run() -> list[tuple[int, dict[str, Any]]]:
        handed: list[int] = []
        chunks = ToolTextChunks(_frames(_pieces(text), handed), ChunkNormalizer("m", False), TOOLS)
        return [(len(handed), chunk) async for chunk in chunks]

    return asyncio.run(run())


def _text(got: list[tuple[int, dict[str, Any]]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for _, c in got if c.get("choices"))


def test_a_reply_opening_with_a_numbered_option_streams_at_once() -> None:
    text = "[1] HAT170 at 10:00, $412\n[2] HAT045 at 15:00, $389\nWhich one would you like?"
    got = _consume(text)
    total = len(_pieces(text)) + 2
    first_content = next(n for n, c in got if c["choices"][0]["delta"].get("content"))
    assert first_content <= 3
    assert first_content < total
    assert _text(got) == text


def test_a_reply_opening_with_a_call_is_held_to_its_end() -> None:
    got = _consume(CALL)
    total = len(_pieces(CALL)) + 2
    assert all(n == total for n, _ in got)
    calls = [tc for _, c in got for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert [json.loads(tc["function"]["arguments"]) for tc in calls] == [{"reservation_id": "ZFA04Y"}]


def test_the_sentence_before_a_call_streams_and_the_call_is_held() -> None:
    sentence = "Let me look up reservation ZFA04Y for you."
    got = _consume(f"{sentence}\n{CALL}")
    total = len(_pieces(f"{sentence}\n{CALL}")) + 2
    early = _text([(n, c) for n, c in got if n < total])  # what reached the client before the reply ended
    assert sentence.startswith(early)
    assert len(early) >= 30
    assert _text(got) == sentence
    held = [c for n, c in got if n == total]
    assert any(c["choices"][0]["delta"].get("tool_calls") for c in held)
    assert held[-1]["choices"][0]["finish_reason"] == "tool_calls"
