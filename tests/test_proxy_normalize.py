"""The pure normalization functions, one upstream quirk at a time."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.upstream.normalize import ChunkNormalizer, chat_completion, error_from_upstream, finish_reason, model_list


@pytest.mark.parametrize(
    ("raw", "tools", "expected"),
    [
        (None, False, None),
        ("stop", False, "stop"),
        ("eos_token", False, "stop"),
        ("eos", False, "stop"),
        ("length", False, "length"),
        ("max_tokens", False, "length"),
        ("stop", True, "tool_calls"),
        ("eos_token", True, "tool_calls"),
        ("tool_calls", True, "tool_calls"),
        ("length", True, "length"),
        ("something_new", False, "stop"),
    ],
)
def test_finish_reason(raw: str | None, tools: bool, expected: str | None) -> None:
    assert finish_reason(raw, tools) == expected


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (
            400,
            {"object": "error", "message": "bad", "type": "BadRequestError", "param": None, "code": 400},
            {"message": "bad", "type": "BadRequestError", "param": None, "code": "400"},
        ),
        (
            500,
            {"error": {"code": 500, "message": "boom", "type": "server_error"}},
            {"message": "boom", "type": "server_error", "param": None, "code": "500"},
        ),
        (
            422,
            {"error": "Input validation error", "error_type": "validation"},
            {"message": "Input validation error", "type": "invalid_request_error", "param": None, "code": "validation"},
        ),
        (
            404,
            {"error": "model 'x' not found"},
            {"message": "model 'x' not found", "type": "invalid_request_error", "param": None, "code": None},
        ),
        (
            502,
            "<html>Bad Gateway</html>",
            {"message": "<html>Bad Gateway</html>", "type": "server_error", "param": None, "code": None},
        ),
        (503, None, {"message": "fallback", "type": "server_error", "param": None, "code": None}),
    ],
)
def test_error_bodies_of_every_upstream(status: int, payload: object, expected: dict[str, Any]) -> None:
    assert error_from_upstream(status, payload, "fallback") == {"error": expected}


def test_ollama_tool_calls_on_one_index_get_their_own() -> None:
    normalizer = ChunkNormalizer("m", include_usage=False)
    calls = [
        {"id": "a", "index": 0, "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "b", "index": 0, "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    chunk = normalizer.chunk(
        {"choices": [{"delta": {"role": "assistant", "tool_calls": calls}, "finish_reason": None}]}
    )
    assert chunk is not None
    assert chunk["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    last = normalizer.chunk({"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})
    assert last is not None
    assert last["choices"][0]["delta"] == {"content": None}
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    assert chunk["id"] == last["id"]


def test_repeated_tool_call_headers_are_sent_once() -> None:
    normalizer = ChunkNormalizer("m", include_usage=False)
    deltas = []
    for piece in ('{"a"', ":1}"):
        call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": piece}}
        chunk = normalizer.chunk({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
        assert chunk is not None
        deltas.append(chunk["choices"][0]["delta"]["tool_calls"][0])
    assert deltas == [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}},
        {"index": 0, "function": {"arguments": ":1}"}},
    ]


def test_usage_inside_a_choice_chunk_is_moved_to_the_final_chunk() -> None:
    normalizer = ChunkNormalizer("m", include_usage=True)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    chunk = normalizer.chunk(
        {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
    )
    assert chunk is not None
    assert "usage" not in chunk
    final = normalizer.usage_chunk()
    assert final is not None
    assert (final["choices"], final["usage"], final["id"]) == ([], usage, "x")


def test_non_streaming_fills_missing_fields() -> None:
    body = chat_completion(
        {"id": "", "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "eos_token"}]},
        "requested",
    )
    (choice,) = body["choices"]
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", "requested")
    assert isinstance(body["created"], int)
    assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "stop")
    assert choice["message"] == {"role": "assistant", "content": "hi", "refusal": None}


def test_single_model_object_becomes_a_list() -> None:
    listed = model_list({"id": "tgi-model", "object": "model", "created": 1, "owned_by": "x"})
    assert listed == {"object": "list", "data": [{"id": "tgi-model", "object": "model", "created": 1, "owned_by": "x"}]}


def test_changed_tells_whether_a_chunk_was_rewritten() -> None:
    """What lets the relay send the upstream's own bytes: ``changed`` is False only for chunks left as they were."""
    normalizer = ChunkNormalizer("m", include_usage=False)
    envelope = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    first = {
        **envelope,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}],
    }
    assert normalizer.chunk(first) is not None
    assert not normalizer.changed
    plain = {**envelope, "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}]}
    assert normalizer.chunk(plain) is not None
    assert not normalizer.changed
    rewritten: list[dict[str, Any]] = [
        {**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "c"}, "finish_reason": None}]},
        {**envelope, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]},
        {**envelope, "choices": [{"index": 0, "delta": {"content": "d"}}]},
        {**envelope, "choices": [{"delta": {"content": "d"}, "finish_reason": None}]},
        {**envelope, "choices": [{"index": 0, "delta": {}, "finish_reason": "eos_token"}]},
        {**envelope, "created": 6, "choices": [{"index": 0, "delta": {"content": "e"}, "finish_reason": None}]},
        {**envelope, "model": "n", "choices": [{"index": 0, "delta": {"content": "e"}, "finish_reason": None}]},
        {**envelope, "usage": None, "choices": [{"index": 0, "delta": {"content": "e"}, "finish_reason": None}]},
        {**envelope, "choices": [{"index": 0, "delta": {"content": "f", "tool_calls": []}, "finish_reason": None}]},
    ]
    for chunk in rewritten:
        assert normalizer.chunk(chunk) is not None
        assert normalizer.changed, chunk
    last = {**envelope, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    assert normalizer.chunk(last) is not None
    assert not normalizer.changed
