"""One Responses API turn through the chat pipeline, and so through supervision exactly as a chat turn.

The request is seen as a chat body (:func:`proxy.responses.translate.chat_body`, with the conversation of its
``previous_response_id`` chain in front); the hooks (:class:`proxy.hooks.ChatHooks`, the supervisor by default)
inject, judge, retry, hold function calls and set the ``x-fama-*`` headers on it as on any chat turn. The answer is
turned back into a Response (or a stream of Responses events, :mod:`proxy.responses.events`) and stored.

How the chat body reaches the model is the context's business: :class:`~proxy.hooks.ChatContext` sends it to
``/chat/completions`` (the bridged path); :class:`proxy.responses.native.NativeContext` sends it to the upstream's
own ``/responses`` (the native path).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.hooks import ChatContext, ChatHooks
from proxy.responses.events import EventWriter
from proxy.responses.store import ResponseStore, StoredResponse
from proxy.responses.translate import chat_messages, new_id, output_items, response_object
from proxy.upstream import normalize

log = logging.getLogger(__name__)


@dataclass
class ResponsesTurn:
    request: dict[str, Any]  # the client's Responses request
    items: list[dict[str, Any]]  # its input, as normalized items with ids
    history: list[dict[str, Any]]  # chat messages of the previous_response_id chain
    response_id: str
    created_at: int

    @classmethod
    def of(cls, request: dict[str, Any], items: list[dict[str, Any]], history: list[dict[str, Any]]) -> ResponsesTurn:
        return cls(request, items, history, new_id("resp"), int(time.time()))

    def skeleton(self) -> dict[str, Any]:
        return response_object(self.request, self.response_id, self.created_at, status="in_progress")

    def stored(self, response: dict[str, Any], session_id: str) -> StoredResponse:
        conversation = [*self.history, *chat_messages(self.items), *chat_messages(response["output"])]
        return StoredResponse(response, self.items, conversation, session_id)


async def save(store: ResponseStore, ctx: ChatContext[Any], turn: ResponsesTurn, response: dict[str, Any]) -> None:
    if turn.request.get("store") is False:
        return
    session_id = ctx.response_headers.get("x-fama-session", "")
    await store.put(ctx.tenant, turn.stored(response, session_id))


async def complete(
    ctx: ChatContext[Any], hooks: ChatHooks[Any], turn: ResponsesTurn, store: ResponseStore
) -> dict[str, Any]:
    """A non-streaming turn: the Response, stored."""
    body = normalize.adapt_for_upstream(await hooks.before_upstream(ctx, ctx.body))
    try:
        completion = await hooks.after_response(ctx, await ctx.complete(body))
    finally:
        await ctx.aclose()
    choice = (completion.get("choices") or [{}])[0]
    response = response_object(
        turn.request,
        turn.response_id,
        turn.created_at,
        output=output_items(choice.get("message") or {}),
        chat_usage=completion.get("usage"),
        finish_reason=choice.get("finish_reason"),
        completed_at=int(time.time()),
    )
    await save(store, ctx, turn, response)
    return response


async def open_stream(
    ctx: ChatContext[Any], hooks: ChatHooks[Any], turn: ResponsesTurn, store: ResponseStore
) -> tuple[AsyncIterator[dict[str, Any]], EventWriter]:
    """A streaming turn: the events to send (upstream error statuses raise here, before any byte is sent)."""
    body = normalize.adapt_for_upstream(await hooks.before_upstream(ctx, ctx.body))
    try:
        chunks = hooks.stream(ctx, await ctx.open_stream(body))
    except BaseException:
        await ctx.aclose()
        raise
    writer = EventWriter(turn.skeleton())
    return _events(writer, chunks, lambda response: save(store, ctx, turn, response)), writer


async def _events(
    writer: EventWriter,
    chunks: AsyncIterator[dict[str, Any]],
    saved: Callable[[dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[dict[str, Any]]:
    for event in writer.start():
        yield event
    async for chunk in chunks:
        for event in writer.chunk(chunk):
            yield event
    for event in writer.close_items():
        yield event
    response = writer.final()
    # Stored before the client hears it is complete: a follow-up request may name it at once.
    await saved(response)
    for event in writer.finish(response):
        yield event
