"""A chat-completion stream as a Responses API event stream, in the order OpenAI sends it.

::

    response.created, response.in_progress
    per text run:     output_item.added (message) -> content_part.added -> output_text.delta* ->
                      output_text.done -> content_part.done -> output_item.done
    per tool call:    output_item.added (function_call) -> function_call_arguments.delta* ->
                      function_call_arguments.done -> output_item.done
    response.completed (or response.incomplete when the token limit cut the answer)

Every event carries the one response id of the stream (also across a supervised retry: the chunks it reads are
already one coherent stream) and a ``sequence_number`` counting from 0. An item is closed before the next opens.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.errors import ProxyError
from proxy.responses.translate import function_call_item, message_item, new_id, usage


class EventWriter:
    def __init__(self, response: dict[str, Any]) -> None:
        """``response``: the Response object as it will be completed, without output or usage yet."""
        self.response = response
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.chat_usage: object = None
        self.trailer: dict[str, Any] | None = None  # the supervisor's ``fama`` summary of the turn
        self._text: dict[str, Any] | None = None  # the message item being streamed
        self._call: dict[str, Any] | None = None  # the function call item being streamed
        self._call_index: int | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def _snapshot(self, status: str) -> dict[str, Any]:
        snapshot = {**self.response, "status": status, "output": [], "completed_at": None}
        snapshot.pop("usage", None)
        return snapshot

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    # -- items ----------------------------------------------------------------------------------------

    def _open_text(self, kind: str) -> list[dict[str, Any]]:
        """Open a message item whose one content part is ``output_text`` or ``refusal``."""
        item = message_item("", new_id("msg"), "in_progress", kind)
        part = item["content"][0]
        self._text = {**item, "content": [], "_kind": kind, "_pieces": []}
        self.output.append(self._text)
        index = len(self.output) - 1
        return [
            self._event("response.output_item.added", output_index=index, item={**item, "content": []}),
            self._event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            ),
        ]

    def _close_text(self) -> list[dict[str, Any]]:
        if self._text is None:
            return []
        item, self._text = self._text, None
        index = self.output.index(item)
        kind = item["_kind"]
        text = "".join(item["_pieces"])
        done = message_item(text, item["id"], kind=kind)
        self.output[index] = done
        ids = {"item_id": done["id"], "output_index": index, "content_index": 0}
        finished = (
            self._event("response.refusal.done", **ids, refusal=text)
            if kind == "refusal"
            else self._event("response.output_text.done", **ids, text=text, logprobs=[])
        )
        return [
            finished,
            self._event("response.content_part.done", **ids, part=done["content"][0]),
            self._event("response.output_item.done", output_index=index, item=done),
        ]

    def _open_call(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        fn = piece.get("function") or {}
        item = function_call_item({"id": piece.get("id"), "function": {"name": fn.get("name")}}, new_id("fc"))
        item["status"] = "in_progress"
        self._call = item
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))]

    def _close_call(self) -> list[dict[str, Any]]:
        if self._call is None:
            return []
        item, self._call = self._call, None
        item["status"] = "completed"
        index = self.output.index(item)
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    # -- chunks ---------------------------------------------------------------------------------------

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage") is not None:
            self.chat_usage = chunk["usage"]
        if isinstance(chunk.get("fama"), dict):
            self.trailer = chunk["fama"]
        choices = chunk.get("choices") or ()
        if not choices or choices[0].get("index", 0) != 0:
            return events
        choice = choices[0]
        delta = choice.get("delta") or {}
        for kind, key in (("output_text", "content"), ("refusal", "refusal")):
            text = delta.get(key)
            if isinstance(text, str) and text:
                events += self._text_delta(kind, text)
        for piece in delta.get("tool_calls") or ():
            index = int(piece.get("index", 0))
            if self._call is None or index != self._call_index:
                events += self._close_text()
                events += self._close_call()
                events += self._open_call(piece)
                self._call_index = index
            assert self._call is not None
            arguments = (piece.get("function") or {}).get("arguments")
            if isinstance(arguments, str) and arguments:
                self._call["arguments"] += arguments
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self._call["id"],
                        output_index=self.output.index(self._call),
                        delta=arguments,
                    )
                )
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        return events

    def _text_delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._text is None or self._text["_kind"] != kind:
            events += self._close_text() + self._close_call()
            events += self._open_text(kind)
        assert self._text is not None
        self._text["_pieces"].append(text)
        ids = {"item_id": self._text["id"], "output_index": self.output.index(self._text), "content_index": 0}
        if kind == "refusal":
            return [*events, self._event("response.refusal.delta", **ids, delta=text)]
        return [*events, self._event("response.output_text.delta", **ids, delta=text, logprobs=[])]

    def final(self) -> dict[str, Any]:
        """The completed Response (closing any open item first is :meth:`finish`'s job)."""
        incomplete = self.finish_reason == "length"
        return {
            **self.response,
            "status": "incomplete" if incomplete else "completed",
            "completed_at": None if incomplete else int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [dict(item) for item in self.output],
            **({"usage": counted} if (counted := usage(self.chat_usage)) is not None else {}),
        }

    def close_items(self) -> list[dict[str, Any]]:
        return self._close_text() + self._close_call()

    def finish(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        extra = {"fama": self.trailer} if self.trailer else {}
        return [self._event(kind, response=response, **extra)]

    def error(self, exc: ProxyError) -> dict[str, Any]:
        """The spec's ``error`` event; its ``error`` object makes the official SDK raise ``APIError``."""
        return self._event("error", code=exc.code, message=exc.message, param=exc.param, error=exc.body()["error"])


def replay(response: dict[str, Any], starting_after: int | None = None) -> list[dict[str, Any]]:
    """A stored Response as the event stream that delivered it (``GET /v1/responses/{id}?stream=true``), its
    items under their stored ids; only events after ``starting_after`` when given."""
    writer = EventWriter({k: v for k, v in response.items() if k not in ("output", "usage")})
    events = writer.start()
    for index, item in enumerate(response.get("output") or ()):
        if item.get("type") == "message":
            text = "".join(
                str(p.get("text") or "") for p in item.get("content") or () if p.get("type") == "output_text"
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(writer._event("response.output_item.added", output_index=index, item={**item, "content": []}))
            events.append(writer._event("response.content_part.added", **ids, part=part))
            events.append(writer._event("response.output_text.delta", **ids, delta=text, logprobs=[]))
            events.append(writer._event("response.output_text.done", **ids, text=text, logprobs=[]))
            events.append(writer._event("response.content_part.done", **ids, part={**part, "text": text}))
        elif item.get("type") == "function_call":
            ids = {"item_id": item["id"], "output_index": index}
            added = {**item, "arguments": "", "status": "in_progress"}
            events.append(writer._event("response.output_item.added", output_index=index, item=added))
            events.append(writer._event("response.function_call_arguments.delta", **ids, delta=item["arguments"]))
            done = {"name": item["name"], "arguments": item["arguments"]}
            events.append(writer._event("response.function_call_arguments.done", **ids, **done))
        events.append(writer._event("response.output_item.done", output_index=index, item=item))
    events.append(writer._event(f"response.{response.get('status', 'completed')}", response=response))
    return [e for e in events if starting_after is None or e["sequence_number"] > starting_after]
