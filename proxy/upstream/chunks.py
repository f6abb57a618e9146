"""Reading an upstream event stream: SSE frames, normalized chunks, tool calls written as text.

:func:`upstream_frames` parses the upstream's SSE bytes with a bounded buffer and yields each ``data:``
payload as parsed JSON, with its bytes, until ``[DONE]``. Every way a stream can fail after its headers were sent is
raised as :class:`~proxy.errors.UpstreamStreamError`: llama.cpp's ``error: {...}`` line, a ``data:``
payload that is an error object (vLLM, TGI), a payload that is not JSON, a dropped connection, a read
timeout.

The client side of a stream is :mod:`proxy.edge.relay`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from proxy.errors import UpstreamStreamError
from proxy.upstream import normalize, textcalls
from proxy.upstream.client import Reply, TransportError

logger = logging.getLogger("fama.proxy.streaming")

MAX_EVENT_BYTES = 4 * 1024 * 1024


def stream_error(payload: object, status: int = 500) -> UpstreamStreamError:
    err = normalize.error_from_upstream(status, payload, "the upstream model server failed mid-stream")["error"]
    return UpstreamStreamError(err["message"], type_=err["type"], param=err["param"], code=err["code"])


def _payload(data: bytes) -> object:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamStreamError("the upstream model server sent a stream chunk that is not JSON") from exc
    if normalize.is_error_event(payload):
        raise stream_error(payload)
    return payload


def _line_event(line: bytes, data: list[bytes]) -> None:
    """Handle one non-empty SSE line; ``data:`` lines accumulate until the blank line ends the event."""
    if line.startswith(b":"):
        return
    name, _, value = line.partition(b":")
    if value.startswith(b" "):
        value = value[1:]
    if name == b"data":
        data.append(value)
    elif name == b"error":  # llama.cpp server: "error: {json}" instead of a data event
        try:
            payload: object = orjson.loads(value)
        except orjson.JSONDecodeError:
            payload = value.decode("utf-8", "replace")
        raise stream_error(payload)


async def upstream_frames(
    reply: Reply, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncGenerator[tuple[object, bytes], None]:
    """Each ``data:`` payload, parsed, with the upstream's own bytes of it."""
    buffer = bytearray()
    data: list[bytes] = []
    finished = False
    sent = False
    try:
        async for part in reply.parts():
            if finished:
                # Read what follows [DONE] (normally just the end of the chunked body) so the upstream
                # connection goes back to the pool instead of being closed.
                buffer += part
                if len(buffer) > max_event_bytes:
                    break
                continue
            buffer += part
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).rstrip(b"\r")
                del buffer[: end + 1]
                if line:
                    _line_event(line, data)
                    continue
                if data:
                    joined = b"\n".join(data)
                    data.clear()
                    if joined.strip() == b"[DONE]":
                        finished = True
                        buffer.clear()
                        break
                    sent = True
                    yield _payload(joined), joined
            if len(buffer) + sum(map(len, data)) > max_event_bytes:
                raise UpstreamStreamError("an upstream stream event exceeded the size limit")
        if finished:
            return
    except TimeoutError as exc:
        if finished:  # the answer was complete; only the connection is not reusable
            return
        raise UpstreamStreamError(
            "the upstream model server stopped sending mid-stream", code="upstream_timeout"
        ) from exc
    except TransportError as exc:
        if finished:
            return
        raise UpstreamStreamError(f"the upstream connection failed mid-stream ({type(exc).__name__})") from exc
    # A stream that ends without a blank line or [DONE] still delivers what it sent.
    if buffer.strip():
        _line_event(bytes(buffer).rstrip(b"\r"), data)
    if data and (joined := b"\n".join(data)).strip() != b"[DONE]":
        yield _payload(joined), joined
    elif not sent:
        # llama-cpp-python answers 200 with an empty event stream when generation fails before the first
        # chunk (unknown tool in tool_choice, context overflow); the client must see an error, not silence.
        raise UpstreamStreamError("the upstream model server ended the stream without sending anything")


class NormalizedChunks:
    """The chunks of an upstream chat stream, normalized (:class:`~proxy.upstream.normalize.ChunkNormalizer`), then the
    usage chunk when the client asked for it.

    ``raw`` holds the upstream's own bytes of the chunk last returned when normalizing left it as it was (None
    otherwise): a relay that sends chunks unmodified sends those bytes instead of serialising the dict again.
    """

    def __init__(
        self, frames: AsyncGenerator[tuple[object, bytes], None], normalizer: normalize.ChunkNormalizer
    ) -> None:
        self._frames = frames
        self._normalizer = normalizer
        self._ended = False
        self.raw: bytes | None = None

    def __aiter__(self) -> NormalizedChunks:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self._ended:
            normalizer = self._normalizer
            async for payload, raw in self._frames:
                if not isinstance(payload, dict):
                    raise UpstreamStreamError("the upstream model server sent a stream chunk that is not a JSON object")
                chunk = normalizer.chunk(payload)
                if chunk is not None:
                    self.raw = None if normalizer.changed else raw
                    return chunk
            self._ended = True
            self.raw = None
            final = normalizer.usage_chunk()
            if final is not None:
                return final
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._ended = True
        await self._frames.aclose()


class ToolTextChunks(NormalizedChunks):
    """:class:`NormalizedChunks` for a request that declares tools, repairing calls the model wrote as text.

    A reply whose text opens like a call (a JSON object or a list of them, a fence, a ``<tool_call>`` tag) is
    held until it ends. Any other reply streams at once, line by line watched: from a line that opens the same
    way (a sentence, then the call), the rest is held. At the end the text goes through
    :func:`proxy.upstream.textcalls.leaked_calls`; when it holds calls of the declared tools, the held part is sent
    as ``tool_calls`` (with whatever prose it held), otherwise the held chunks go out unchanged. The hold is
    bounded by :data:`proxy.upstream.textcalls.MAX_CHARS`; beyond it the chunks are released as text.
    """

    def __init__(
        self,
        frames: AsyncGenerator[tuple[object, bytes], None],
        normalizer: normalize.ChunkNormalizer,
        tools: frozenset[str],
        on_repair: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(frames, normalizer)
        self._tools = tools
        self._on_repair = on_repair
        # "undecided" (nothing but whitespace yet) -> "hold" (opens like a call) or "pass" (streaming prose);
        # "pass" -> "line" (a new line may open a call) -> "hold" or back to "pass"; "done": relay the rest.
        self._mode = "undecided"
        self._held: list[tuple[dict[str, Any], bytes | None]] = []
        self._out: list[tuple[dict[str, Any], bytes | None]] = []
        self._text: list[str] = []
        self._size = 0
        self._sent = 0  # characters of text already released
        self._line: str | None = None  # the current line while it may still open a call

    async def __anext__(self) -> dict[str, Any]:
        while not self._out:
            if self._mode == "done":
                return await super().__anext__()
            try:
                chunk = await super().__anext__()
            except StopAsyncIteration:
                self._release(final=True)
                if not self._out:
                    raise
                break
            self._take(chunk, self.raw)
        chunk, self.raw = self._out.pop(0)
        return chunk

    def _take(self, chunk: dict[str, Any], raw: bytes | None) -> None:
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        if len(choices) > 1 or (choices and choices[0].get("index", 0) != 0) or delta.get("tool_calls"):
            self._held.append((chunk, raw))
            self._release(final=False)  # several choices or real tool calls: nothing to repair
            self._mode = "done"
            return
        content = delta.get("content")
        content = content if isinstance(content, str) else ""
        if self._mode == "pass" and not content:
            self._out.append((chunk, raw))
            return
        self._held.append((chunk, raw))
        self._text.append(content)
        self._size += len(content)
        if self._size > textcalls.MAX_CHARS:
            self._release(final=False)
            self._mode = "done"
            return
        state: bool | None
        if self._mode == "undecided":
            text = "".join(self._text)
            if not text.strip():
                return
            opens = textcalls.line_opens_call(text)
            if opens is not False:
                self._mode = "hold" if opens else "undecided"
                return
            state = self._scan(text)  # the first line is prose; a later line in the same text may open a call
        elif self._mode in ("pass", "line"):
            state = self._scan(content)
        else:
            return
        if state is False:
            self._release(final=False)
            self._mode = "pass"
        else:
            self._mode = "hold" if state else "line"

    def _scan(self, content: str) -> bool | None:
        """Feed streamed text: True once a line opens like a call, None while the last line may still, else False."""
        lines = content.split("\n")
        if self._line is not None:
            lines[0] = self._line + lines[0]
        else:
            del lines[0]  # the rest of a prose line
        self._line = None
        for i, line in enumerate(lines):
            state = textcalls.line_opens_call(line)
            if state:
                return True
            if state is None and i == len(lines) - 1:
                self._line = line
                return None
        return False

    def _release(self, *, final: bool) -> None:
        """Queue the held chunks: as tool calls when the held text ends the reply with calls, else as they came."""
        held, self._held = self._held, []
        if final and self._mode in ("hold", "line") and held:
            text = "".join(self._text)
            found = textcalls.leaked_calls(text, self._tools)
            sent = text[: self._sent].strip()
            if found is not None and (found[0] or "").startswith(sent):
                prose = (found[0] or "")[len(sent) :]
                self._out.extend((c, None) for c in _call_chunks(held, prose or None, found[1], opening=not sent))
                if self._on_repair is not None:
                    self._on_repair()
                return
        self._out.extend(held)
        self._sent = self._size


def _call_chunks(
    held: list[tuple[dict[str, Any], bytes | None]], prose: str | None, calls: list[dict[str, Any]], *, opening: bool
) -> list[dict[str, Any]]:
    """The held reply re-sent as OpenAI streams tool calls: prose (if any), one delta per call, the finish.

    ``opening``: nothing of the reply went out yet, so the first chunk carries the assistant role.
    """
    template = next((c for c, _ in held if c.get("choices")), held[0][0])
    base = {k: v for k, v in template.items() if k not in ("choices", "usage")}
    entries = textcalls.tool_call_entries(calls)
    first: dict[str, Any] = {"role": "assistant", "content": prose} if opening else {"content": prose}
    out: list[dict[str, Any]] = []
    if opening or (prose and prose.strip()):
        out.append({**base, "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
    for i, entry in enumerate(entries):
        out.append(
            {**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, **entry}]}, "finish_reason": None}]}
        )
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    # Chunks without choices (e.g. usage the upstream sent early) keep their place after the reply.
    out.extend(c for c, _ in held if not c.get("choices"))
    return out


class RelayedChunks:
    """An upstream stream relayed as it is (completions): each object payload, ``raw`` being its own bytes."""

    def __init__(self, frames: AsyncGenerator[tuple[object, bytes], None]) -> None:
        self._frames = frames
        self.raw: bytes | None = None

    def __aiter__(self) -> RelayedChunks:
        return self

    async def __anext__(self) -> dict[str, Any]:
        async for payload, raw in self._frames:
            if isinstance(payload, dict):
                self.raw = raw
                return payload
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._frames.aclose()
