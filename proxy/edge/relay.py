"""The client side of a stream: sending normalized chunks to the client as SSE events.

:func:`relay` is the one generator handed to sse-starlette (which does the framing and notices a client
disconnect). It turns an upstream failure into a last ``data: {"error": {...}}`` event, for which the official SDK
raises ``APIError``, then ends without ``[DONE]``. Its ``finally`` closes the upstream responses, so a client
disconnect cancels the upstream request at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from proxy.errors import ProxyError, UpstreamStreamError
from proxy.metrics import ProxyMetrics
from proxy.tracing import Trace
from proxy.upstream.chunks import NormalizedChunks, RelayedChunks

logger = logging.getLogger("fama.proxy.streaming")


class EventStream(EventSourceResponse):
    """sse-starlette's response. Without a send timeout (none is set here) each event is sent as such: its
    timeout wrapper would open an anyio cancel scope per event, a large share of the proxy's CPU per stream."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def _has_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or choice
        if delta.get("content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


def _event(payload: object) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(payload).decode())


async def relay(
    chunks: AsyncIterator[dict[str, Any]],
    trace: Trace,
    metrics: ProxyMetrics,
    close: Callable[[], Awaitable[None]],
    unmodified: NormalizedChunks | RelayedChunks | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Send ``chunks`` as SSE events, then ``[DONE]``; a failure becomes a final error event.

    ``unmodified`` is the source of ``chunks`` when nothing between it and here changes a chunk: its upstream
    bytes are sent where normalizing changed nothing.
    """
    metrics.active_streams.inc()
    waiting_first = True
    try:
        async for chunk in chunks:
            if waiting_first and _has_output(chunk):
                waiting_first = False
                metrics.ttft.labels(metrics.model_label(trace.model)).observe(time.perf_counter() - trace.started)
            raw = unmodified.raw if unmodified is not None else None
            # orjson.loads accepted these bytes, so they are valid UTF-8.
            yield ServerSentEvent(data=raw.decode()) if raw is not None else _event(chunk)
        yield ServerSentEvent(data="[DONE]")
    except UpstreamStreamError as exc:
        metrics.upstream_errors.labels("stream").inc()
        yield _event(exc.body())
    except ProxyError as exc:  # a hook's own upstream call (e.g. a retry) failed after headers were sent
        yield _event(exc.body())
    except Exception:  # a bug in the proxy or a hook: the client still gets an error it can act on
        logger.exception("stream failed inside the proxy (request %s)", trace.request_id)
        yield _event(ProxyError("internal error in the proxy; see its log", code="internal_error").body())
    finally:
        metrics.active_streams.dec()
        with anyio.CancelScope(shield=True):  # runs while a client disconnect cancels this task
            await close()
            if isinstance(chunks, AsyncGenerator | NormalizedChunks | RelayedChunks):
                await chunks.aclose()
