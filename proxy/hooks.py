"""The supervision seam: one chat turn's context (:class:`ChatContext`) and the hooks that may rewrite it.

Supervision plugs in by passing a :class:`ChatHooks` subclass to ``create_app``. A hook that retries calls
``ctx.complete(new_body)`` / ``ctx.open_stream(new_body)`` again: every upstream response the context opened is
closed when the turn ends (``ctx.aclose``), also on client disconnect. Hooks see normalized, spec-valid dicts only;
upstream errors reach them as :class:`~proxy.errors.ProxyError`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from proxy.errors import UpstreamStreamError
from proxy.metrics import ProxyMetrics
from proxy.tracing import Trace
from proxy.upstream import normalize, textcalls
from proxy.upstream.chunks import NormalizedChunks, ToolTextChunks, upstream_frames
from proxy.upstream.client import Reply, Upstream

PATH = "/chat/completions"
REPAIRED_HEADER = "x-fama-repaired"  # non-streaming answers whose tool calls the model wrote as text
logger = logging.getLogger("fama.proxy.chat")
S = TypeVar("S")  # a hook's per-turn state


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


@dataclass
class ChatContext(Generic[S]):
    """One chat turn: who asked, how to reach the upstream, and every upstream response it opened."""

    body: dict[str, Any]
    tenant: str
    trace: Trace
    upstream: Upstream
    metrics: ProxyMetrics
    upstream_headers: dict[str, str]
    _open: list[Reply] = field(default_factory=list)
    request_headers: Mapping[str, str] = field(default_factory=dict)  # the client's (e.g. x-fama-session)
    response_headers: dict[str, str] = field(default_factory=dict)  # hooks add theirs; sent with the response
    hook_state: S | None = None  # the hooks' per-turn state, from request to answer
    api: str = "chat"  # the API the client called (chat, responses): a label on the supervision metrics
    # The client's harness reads actions from the text (a ReAct agent): calls written as text stay text.
    text_actions: bool = False

    @property
    def model(self) -> str:
        model: str = self.body["model"]
        return model

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        payload = await self.upstream.request_json("POST", PATH, self.upstream_headers, self.trace, orjson.dumps(body))
        if not isinstance(payload, dict):
            raise UpstreamStreamError("the upstream model server answered with something other than a JSON object")
        response = normalize.chat_completion(payload, self.model)
        tools = frozenset() if self.text_actions else textcalls.declared_tools(body)
        if tools:
            for choice in response.get("choices") or []:
                if isinstance(choice.get("message"), dict) and textcalls.repair_message(choice["message"], tools):
                    choice["finish_reason"] = "tool_calls"
                    self.metrics.text_tool_calls.labels(stream="false").inc()
                    self.response_headers[REPAIRED_HEADER] = "text-tool-calls"
                    logger.info("tool calls written as text sent as tool_calls (request %s)", self.trace.request_id)
        return response

    async def open_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Open a streamed completion; upstream error statuses raise here, before any byte is sent."""
        reply = await self.upstream.open("POST", PATH, self.upstream_headers, self.trace, orjson.dumps(body))
        self._open.append(reply)
        normalizer = normalize.ChunkNormalizer(self.model, wants_usage(body))
        tools = frozenset() if self.text_actions else textcalls.declared_tools(body)
        if tools:
            return ToolTextChunks(upstream_frames(reply), normalizer, tools, self._count_stream_repair)
        return NormalizedChunks(upstream_frames(reply), normalizer)

    def _count_stream_repair(self) -> None:
        # The stream's headers left before the reply was read: the metric and the log say it instead.
        self.metrics.text_tool_calls.labels(stream="true").inc()
        logger.info("streamed tool calls written as text sent as tool_calls (request %s)", self.trace.request_id)

    async def aclose(self) -> None:
        while self._open:
            self._open.pop().close()


class ChatHooks(Generic[S]):
    """The supervision seam, with per-turn state of type ``S`` in ``ctx.hook_state``. The defaults pass everything
    through unchanged."""

    async def start(self) -> None:
        """Open the hooks' resources; called from the app's lifespan."""

    async def stop(self) -> None:
        """Close them; called from the app's lifespan."""

    async def before_upstream(self, ctx: ChatContext[S], body: dict[str, Any]) -> dict[str, Any]:
        return body

    async def after_response(self, ctx: ChatContext[S], response: dict[str, Any]) -> dict[str, Any]:
        return response

    def stream(self, ctx: ChatContext[S], chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        return chunks
