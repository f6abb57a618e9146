"""Responses API <-> chat completions, as pure functions; what is produced validates against OpenAI's spec and the
official SDK's types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import InvalidRequest
from proxy.responses.events import EventWriter
from proxy.responses.native import chat_completion, input_from_chat
from proxy.responses.translate import (
    chat_body,
    chat_messages,
    input_items,
    output_items,
    response_object,
    usage,
)
from tests.openapi_schemas import openapi_errors

TOOL = {
    "type": "function",
    "name": "cancel_reservation",
    "description": "Cancel a reservation.",
    "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}}},
    "strict": False,
}
INPUT: list[Any] = [
    {"role": "user", "content": "Cancel ZFA04Y."},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_reservation", "arguments": '{"id":"ZFA04Y"}'},
    {"type": "function_call", "call_id": "call_2", "name": "get_user", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"status":"booked"}'},
    {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
    {"type": "reasoning", "id": "rs_1", "summary": []},
    {"role": "user", "content": [{"type": "input_text", "text": "yes, "}, {"type": "input_text", "text": "go ahead"}]},
]
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def test_input_items_become_the_chat_conversation() -> None:
    request = {"model": "m", "instructions": "Be careful.", "input": INPUT, "tools": [TOOL]}
    body = chat_body(request, [], input_items(INPUT))
    assert body["messages"] == [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": "Cancel ZFA04Y."},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_reservation", "arguments": '{"id":"ZFA04Y"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_user", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status":"booked"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
        {"role": "user", "content": "yes, go ahead"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {k: TOOL[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    assert "stream" not in body


def test_history_comes_between_instructions_and_input_and_sampling_is_renamed() -> None:
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "answer"}]
    request = {"model": "m", "instructions": "I", "input": "now", "max_output_tokens": 50, "temperature": 0.2}
    body = chat_body({**request, "stream": True}, history, input_items("now"))
    assert [m["content"] for m in body["messages"]] == ["I", "earlier", "answer", "now"]
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.2
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", "auto"),
        ("required", "required"),
        (
            {"type": "function", "name": "cancel_reservation"},
            {"type": "function", "function": {"name": "cancel_reservation"}},
        ),
    ],
)
def test_tool_choice(tool_choice: Any, expected: Any) -> None:
    body = chat_body({"model": "m", "input": "x", "tools": [TOOL], "tool_choice": tool_choice}, [], input_items("x"))
    assert body["tool_choice"] == expected


def test_text_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    body = chat_body({"model": "m", "input": "x", "text": {"format": fmt}}, [], input_items("x"))
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    plain = chat_body({"model": "m", "input": "x", "text": {"format": {"type": "text"}}}, [], input_items("x"))
    assert "response_format" not in plain


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"model": "m", "input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ],
)
def test_what_chat_completions_cannot_do_is_a_400_naming_the_param(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_body(request_body, [], input_items(request_body["input"]))
    assert caught.value.param == param


def test_stored_items_list_as_the_sdk_types_them() -> None:
    from openai.types.responses.response_item import ResponseItem

    items = input_items(INPUT)
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        if item["type"] != "reasoning":
            TypeAdapter(ResponseItem).validate_python(item)


def test_the_answer_becomes_a_spec_valid_response(openai_schemas: Path) -> None:
    message = {
        "role": "assistant",
        "content": "I will cancel it.",
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "cancel_reservation", "arguments": "{}"}}
        ],
    }
    request = {"model": "m", "input": "x", "tools": [TOOL], "instructions": "I"}
    chat_usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    response = response_object(
        request, "resp_1", 1, output=output_items(message), chat_usage=chat_usage, completed_at=2
    )
    assert openapi_errors(openai_schemas, "Response", response) == []
    parsed = Response.model_validate(response)
    assert parsed.output_text == "I will cancel it."
    assert [o.type for o in parsed.output] == ["message", "function_call"]
    assert parsed.usage is not None
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (7, 3, 10)
    # What a Response says, read back as chat, is what the chat side said.
    assert chat_messages(response["output"]) == [message]
    assert chat_completion(response)["choices"][0]["message"] == message


def test_a_cut_answer_is_incomplete() -> None:
    response = response_object({"model": "m"}, "resp_1", 1, output=[], finish_reason="length")
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


def test_usage_none_without_chat_usage() -> None:
    assert usage(None) is None


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_a_chat_stream_becomes_the_event_sequence_openai_sends(openai_schemas: Path) -> None:
    request = {"model": "m", "input": "x", "tools": [TOOL]}
    writer = EventWriter(response_object(request, "resp_s", 1, status="in_progress"))
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Sure"}),
        _chunk({"content": "."}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]
            }
        ),
        _chunk({}, "tool_calls"),
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    ]
    events = writer.start()
    for chunk in chunks:
        events += writer.chunk(chunk)
    events += writer.close_items()
    events += writer.finish(writer.final())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert openapi_errors(openai_schemas, "ResponseStreamEvent", event) == [], event
        EVENTS.validate_python(event)
    final = events[-1]["response"]
    assert {e["response"]["id"] for e in events if "response" in e} == {"resp_s"}
    assert [(o["type"], o.get("arguments")) for o in final["output"]] == [
        ("message", None),
        ("function_call", '{"a":1}'),
        ("function_call", "{}"),
    ]
    assert final["output"][0]["content"][0]["text"] == "Sure."
    assert final["usage"]["total_tokens"] == 3


def test_chat_messages_round_trip_through_native_input() -> None:
    messages = chat_messages(input_items(INPUT))
    assert chat_messages(input_items(input_from_chat(messages))) == messages


def test_a_refusal_is_a_refusal_part_streamed_and_not(openai_schemas: Path) -> None:
    writer = EventWriter(response_object({"model": "m"}, "resp_r", 1, status="in_progress"))
    events = writer.start()
    for delta in ({"role": "assistant", "refusal": "I can"}, {"refusal": "not help."}):
        events += writer.chunk(_chunk(delta))
    events += writer.chunk(_chunk({}, "stop"))
    events += writer.close_items()
    events += writer.finish(writer.final())
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    for event in events:
        assert openapi_errors(openai_schemas, "ResponseStreamEvent", event) == [], event
        EVENTS.validate_python(event)
    assert events[-1]["response"]["output"][0]["content"] == [{"type": "refusal", "refusal": "I cannot help."}]

    message = {"role": "assistant", "content": None, "refusal": "I cannot help."}
    response = response_object({"model": "m"}, "resp_r", 1, output=output_items(message))
    assert openapi_errors(openai_schemas, "Response", response) == []
    [item] = Response.model_validate(response).output
    assert item.type == "message"
    assert [part.type for part in item.content] == ["refusal"]
