"""Tool calls a model wrote as text reach the client as tool_calls: official SDK -> proxy -> scripted model.

The leaked texts are shaped like qwen2.5-7b's in the tau2 airline run (tests/test_textcalls.py checks the
parser on those very messages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageFunctionToolCall

from detector_service.contract.wire import Category
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import LOOKED_UP, QUESTION, TOOLS, interventions, proxy_for

LEAKED_LOOKUP = '{\n  "name": "get_reservation_details",\n  "arguments": {\n    "reservation_id": "ZFA04Y"\n  }\n}'
LEAKED_CANCEL = '```json\n{"name": "cancel_reservation", "arguments": {"reservation_id": "ZFA04Y"}}\n```'


def _replies(text: str) -> ScriptedModel:
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        return {"content": text}

    return ScriptedModel(reply)


def _stream(client: Any, **extra: Any) -> list[ChatCompletionChunk]:
    return list(
        client.chat.completions.create(
            model="m", messages=LOOKED_UP, tools=TOOLS, stream=True, stream_options={"include_usage": True}, **extra
        )
    )


def _calls(chunks: list[ChatCompletionChunk]) -> list[Any]:
    return [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]


def _text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _metric(app: Any, stream: str) -> float:
    value = app.metrics.registry.get_sample_value("fama_text_tool_calls_total", {"stream": stream})
    return float(value or 0.0)


def test_a_call_written_as_text_arrives_as_a_tool_call(tmp_path: Path) -> None:
    with proxy_for(_replies(LEAKED_LOOKUP), tmp_path) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-repaired"] == "text-tool-calls"
        completion = raw.parse()
        chunks = _stream(client)
        assert _metric(app, "false") == 1.0
        assert _metric(app, "true") == 1.0
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [called] = choice.message.tool_calls or []
    assert isinstance(called, ChatCompletionMessageFunctionToolCall)
    assert called.function.name == "get_reservation_details"
    assert json.loads(called.function.arguments) == {"reservation_id": "ZFA04Y"}
    [streamed] = _calls(chunks)
    assert streamed.function is not None
    assert streamed.function.name == "get_reservation_details"
    assert json.loads(streamed.function.arguments or "") == {"reservation_id": "ZFA04Y"}
    assert _text(chunks) == ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None


def test_a_repaired_write_is_supervised_like_any_call(tmp_path: Path) -> None:
    # The cancellation the model wrote as text is unconfirmed: enforce mode retries it like a real call.
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        retry = body["messages"][-1]["role"] == "system"
        return {"content": QUESTION if retry else LEAKED_CANCEL}

    with proxy_for(ScriptedModel(reply), tmp_path, mode="enforce") as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        completion = raw.parse()
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        assert completion.choices[0].message.content == QUESTION
        assert [i.categories for i in interventions(app)] == [[Category.DCV]]
        chunks = _stream(client)  # streamed: the held text became a call, held again until its verdict
        assert _text(chunks) == QUESTION
        assert _calls(chunks) == []
        assert [i.categories for i in interventions(app)] == [[Category.DCV], [Category.DCV]]


def test_text_answers_and_requests_without_tools_are_untouched(tmp_path: Path) -> None:
    with proxy_for(_replies(LEAKED_LOOKUP), tmp_path) as (client, app):
        untouched = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP)
        assert "x-fama-repaired" not in untouched.headers
        plain = untouched.parse()  # no tools declared
        refused = client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS, tool_choice="none")
        streamed = _stream(client, tool_choice="none")
        assert _metric(app, "false") == 0.0
        assert _metric(app, "true") == 0.0
    assert plain.choices[0].message.content == LEAKED_LOOKUP
    assert refused.choices[0].message.content == LEAKED_LOOKUP
    assert _text(streamed) == LEAKED_LOOKUP
    assert _calls(streamed) == []
    with proxy_for(_replies(QUESTION), tmp_path) as (client, _app):
        chunks = _stream(client)
    assert _text(chunks) == QUESTION
    assert _calls(chunks) == []


def test_json_that_is_no_call_is_released_as_text(tmp_path: Path) -> None:
    # The stream is held while it looks like a call; it was not one, so it goes out as it came.
    answer = '{"total": 412, "currency": "USD"}'
    with proxy_for(_replies(answer), tmp_path) as (client, app):
        chunks = _stream(client)
        completion = client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert _metric(app, "true") == 0.0
    assert _text(chunks) == answer
    assert _calls(chunks) == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert completion.choices[0].message.content == answer


def test_a_call_written_after_a_sentence_arrives_as_a_tool_call_when_streamed(tmp_path: Path) -> None:
    # qwen often says what it is about to do, then writes the call; the sentence streams at once.
    sentence = "I'll look up your reservation now."
    with proxy_for(_replies(f"{sentence}\n{LEAKED_LOOKUP}"), tmp_path) as (client, app):
        chunks = _stream(client)
        assert _metric(app, "true") == 1.0
    assert _text(chunks) == sentence
    [streamed] = _calls(chunks)
    assert streamed.function is not None
    assert streamed.function.name == "get_reservation_details"
    assert json.loads(streamed.function.arguments or "") == {"reservation_id": "ZFA04Y"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    # The sentence went out before the call was held: its first pieces precede everything about the call.
    first_call = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.tool_calls)
    assert _text(chunks[:first_call]) == sentence
    assert sum(1 for c in chunks[:first_call] if c.choices and c.choices[0].delta.content) > 2


def test_a_later_line_that_is_no_call_streams_as_text(tmp_path: Path) -> None:
    answer = "Here are your options:\n[1] HAT170 at 10:00\n[2] HAT045 at 15:00\n```\nbusiness: $412\n```\nWhich one?"
    with proxy_for(_replies(answer), tmp_path) as (client, app):
        chunks = _stream(client)
        assert _metric(app, "true") == 0.0
    assert _text(chunks) == answer
    assert _calls(chunks) == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_call_after_a_sentence_is_supervised_when_streamed(tmp_path: Path) -> None:
    # The cancellation written after a sentence is unconfirmed: enforce mode retries it like a real call.
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        retry = body["messages"][-1]["role"] == "system"
        return {"content": QUESTION if retry else f"Sure, cancelling it now.\n{LEAKED_CANCEL}"}

    with proxy_for(ScriptedModel(reply), tmp_path, mode="enforce") as (client, app):
        chunks = _stream(client)
        assert [i.categories for i in interventions(app)] == [[Category.DCV]]
    assert _calls(chunks) == []
    assert _text(chunks).endswith(QUESTION)


MODEL_FORMATS = {
    "llama-3.2 pythonic": '[get_reservation_details(reservation_id="ZFA04Y")]',
    "llama-3.1 python_tag": '<|python_tag|>{"name": "get_reservation_details", "parameters": {"reservation_id": "ZFA04Y"}}',
    "llama-3.1 function tag": '<function=get_reservation_details>{"reservation_id": "ZFA04Y"}</function>',
    "mistral": '[TOOL_CALLS] [{"name": "get_reservation_details", "arguments": {"reservation_id": "ZFA04Y"}}]',
    "granite": '<|tool_call|>[{"name": "get_reservation_details", "arguments": {"reservation_id": "ZFA04Y"}}]',
}


def test_calls_in_the_models_own_formats_arrive_as_tool_calls_streamed_or_not(tmp_path: Path) -> None:
    # A server run without the model's tool parser hands its call format to the client as text.
    for name, text in MODEL_FORMATS.items():
        with proxy_for(_replies(text), tmp_path) as (client, app):
            completion = client.chat.completions.create(model="m", messages=LOOKED_UP, tools=TOOLS)
            chunks = _stream(client)
            assert (_metric(app, "false"), _metric(app, "true")) == (1.0, 1.0), name
        [called] = completion.choices[0].message.tool_calls or []
        assert isinstance(called, ChatCompletionMessageFunctionToolCall)
        assert (called.function.name, json.loads(called.function.arguments)) == (
            "get_reservation_details",
            {"reservation_id": "ZFA04Y"},
        ), name
        assert completion.choices[0].message.content is None, name
        [streamed] = _calls(chunks)
        assert streamed.function is not None
        assert streamed.function.name == "get_reservation_details", name
        assert _text(chunks) == "", name
