"""The official OpenAI SDK (strict validation) through the proxy, in front of every upstream style."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.proxy_harness import MESSAGES, TOOLS, running_proxy, sdk
from tests.scripted_upstream import CALLS, CONTENT, STYLES, USAGE, ScriptedUpstream
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    scripted = ScriptedUpstream()
    with serve_in_thread(scripted.app) as url:
        yield scripted, url + "/v1"


@pytest.fixture(scope="module")
def proxy_url(upstream: tuple[ScriptedUpstream, str]) -> Iterator[str]:
    with running_proxy(upstream[1]) as url:
        yield url


@pytest.fixture
def scripted(upstream: tuple[ScriptedUpstream, str]) -> ScriptedUpstream:
    return upstream[0]


@pytest.fixture
def client(proxy_url: str) -> Iterator[openai.OpenAI]:
    with sdk(proxy_url) as client:
        yield client


def final_completion(client: openai.OpenAI, model: str, stream: bool, **kwargs: Any) -> ChatCompletion:
    if stream:
        with client.chat.completions.stream(model=model, messages=MESSAGES, tools=TOOLS, **kwargs) as events:
            return events.get_final_completion()
    completion: ChatCompletion = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, **kwargs)
    return completion


def outcome(completion: ChatCompletion) -> dict[str, Any]:
    """What an agent acts on: everything but ids, timestamps and the server's model name."""
    (choice,) = completion.choices
    message = choice.message
    calls = [
        (call.type, call.function.name, call.function.arguments)
        for call in message.tool_calls or []
        if call.type == "function"
    ]
    return {
        "role": message.role,
        "content": message.content,
        "refusal": message.refusal,
        "tool_calls": calls,
        "finish_reason": choice.finish_reason,
    }


# TGI emits one tool call per turn, so it has no "tools" script.
CASES = [
    (style, scenario)
    for style in STYLES
    for scenario in ("text", "tool", "tools")
    if (style, scenario) != ("tgi", "tools")
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("style", "scenario"), CASES)
def test_every_style_aggregates_to_the_spec_conformant_result(
    client: openai.OpenAI, style: str, scenario: str, stream: bool
) -> None:
    expected = outcome(final_completion(client, f"openai:{scenario}", stream))
    got = outcome(final_completion(client, f"{style}:{scenario}", stream))
    assert got == expected


def test_streamed_text(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="ollama:text", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CONTENT
    assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_non_streamed_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tgi:text", messages=MESSAGES)
    assert completion.choices[0].message.content == CONTENT
    assert completion.choices[0].finish_reason == "stop"  # TGI said eos_token
    assert completion.id  # TGI sent an empty id
    assert completion.object == "chat.completion"


@pytest.mark.parametrize("style", ["openai", "vllm", "ollama", "llamacpp"])
def test_several_streamed_tool_calls_keep_their_own_index_and_header(client: openai.OpenAI, style: str) -> None:
    stream = client.chat.completions.create(model=f"{style}:tools", messages=MESSAGES, tools=TOOLS, stream=True)
    deltas = [call for chunk in stream for choice in chunk.choices for call in choice.delta.tool_calls or []]
    headers = [d for d in deltas if d.id is not None]
    assert [(d.index, d.type, d.function and d.function.name) for d in headers] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    for d in deltas:
        if d.id is None:  # continuation deltas carry arguments only
            assert d.type is None
            assert d.function is None or d.function.name is None
    by_index: dict[int, str] = {}
    for d in deltas:
        if d.function and d.function.arguments:
            by_index[d.index] = by_index.get(d.index, "") + d.function.arguments
    assert [json.loads(by_index[i]) for i in (0, 1)] == [json.loads(c.arguments) for c in CALLS]


def test_non_streamed_tool_calls_have_string_arguments_and_tool_calls_finish(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tgi:tool", messages=MESSAGES, tools=TOOLS)
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.arguments == '{"city":"Paris"}'  # TGI sent an object
    assert completion.choices[0].finish_reason == "tool_calls"  # TGI said eos_token
    ollama = client.chat.completions.create(model="ollama:tools", messages=MESSAGES, tools=TOOLS)
    assert ollama.choices[0].finish_reason == "tool_calls"  # Ollama said stop
    assert [c.function.name for c in ollama.choices[0].message.tool_calls or [] if c.type == "function"] == [
        "get_weather",
        "get_time",
    ]


@pytest.mark.parametrize("style", ["openai", "vllm", "ollama", "llamacpp"])
def test_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI, style: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=f"{style}:text", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == USAGE
    assert all(c.usage is None for c in chunks[:-1])  # llama.cpp put it inside the finish chunk


def test_include_usage_without_upstream_usage_ends_with_null_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tgi:text", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CONTENT


def test_usage_is_not_sent_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="llamacpp:text", messages=MESSAGES, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_unknown_fields_are_forwarded_untouched(client: openai.OpenAI, scripted: ScriptedUpstream) -> None:
    extras = {
        "top_k": 20,
        "guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "chat_template_kwargs": {"enable_thinking": False},
        "repetition_penalty": 1.05,
    }
    client.chat.completions.create(
        model="vllm:text",
        messages=MESSAGES,
        temperature=0.2,
        parallel_tool_calls=False,
        tools=TOOLS,
        tool_choice="auto",
        response_format={"type": "json_object"},
        logprobs=True,
        n=1,
        extra_body=extras,
    )
    body = scripted.last.body
    for key, value in extras.items():
        assert body[key] == value
    assert body["tools"] == TOOLS
    assert (body["tool_choice"], body["parallel_tool_calls"], body["logprobs"]) == ("auto", False, True)
    assert body["response_format"] == {"type": "json_object"}


def test_assistant_tool_call_with_null_content_is_sent_with_empty_content(
    client: openai.OpenAI, scripted: ScriptedUpstream
) -> None:
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": None, "refusal": None},
    ]
    client.chat.completions.create(model="llamacpp:text", messages=history)
    sent = scripted.last.body["messages"]
    assert sent[1]["content"] == ""
    assert sent[1]["tool_calls"] == history[1]["tool_calls"]
    assert sent[3]["content"] is None  # no tool calls: left as the client sent it


def test_request_id_is_propagated_upstream_and_back(proxy_url: str, scripted: ScriptedUpstream) -> None:
    with sdk(proxy_url, default_headers={"x-request-id": "req-abc.123"}) as client:
        raw = client.chat.completions.with_raw_response.create(model="openai:text", messages=MESSAGES)
    assert raw.headers["x-request-id"] == "req-abc.123"
    assert scripted.last.headers["x-request-id"] == "req-abc.123"
    with sdk(proxy_url) as client:
        generated = client.chat.completions.with_raw_response.create(model="openai:text", messages=MESSAGES)
    assert len(generated.headers["x-request-id"]) == 32
    assert scripted.last.headers["x-request-id"] == generated.headers["x-request-id"]


def test_client_key_passes_through_when_no_upstream_key(client: openai.OpenAI, scripted: ScriptedUpstream) -> None:
    client.chat.completions.create(model="openai:text", messages=MESSAGES)
    assert scripted.last.headers["authorization"] == "Bearer client-key"


def test_upstream_key_replaces_the_client_key(upstream: tuple[ScriptedUpstream, str]) -> None:
    scripted, url = upstream
    with running_proxy(url, upstream_api_key="sk-upstream-1") as proxy, sdk(proxy) as client:
        client.chat.completions.create(model="openai:text", messages=MESSAGES)
    assert scripted.last.headers["authorization"] == "Bearer sk-upstream-1"


def test_completions_embeddings_and_models(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="m", prompt="Say hello")
    assert completion.choices[0].text == CONTENT
    # The spec (and so the SDK's strict mode) types a legacy completion chunk's finish_reason as non-null,
    # yet OpenAI itself sends null until the last chunk: stream these with the SDK's default validation.
    with openai.OpenAI(base_url=str(client.base_url), api_key="client-key", max_retries=0) as lenient:
        streamed = "".join(c.choices[0].text for c in lenient.completions.create(model="m", prompt="x", stream=True))
    assert streamed == CONTENT
    embedding = client.embeddings.create(model="e", input=["a", "b"], encoding_format="float")
    assert [d.index for d in embedding.data] == [0, 1]
    assert embedding.data[1].embedding == [0.25, -0.5, 1.0]
    assert [m.id for m in client.models.list()] == ["gpt-test"]
    assert client.models.retrieve("gpt-test").owned_by == "org"


@pytest.mark.parametrize("style", ["llamacpp", "tgi", "ollama"])
def test_models_of_servers_without_a_model_route_or_list(style: str) -> None:
    scripted = ScriptedUpstream(models_style=style)
    with serve_in_thread(scripted.app) as url, running_proxy(url + "/v1") as proxy, sdk(proxy) as client:
        models = list(client.models.list())
        assert len(models) == 1
        assert client.models.retrieve(models[0].id).id == models[0].id
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no/such-model")


def test_model_ids_may_contain_slashes(proxy_url: str, upstream: tuple[ScriptedUpstream, str]) -> None:
    scripted = ScriptedUpstream(models_style="vllm")
    with serve_in_thread(scripted.app) as url, running_proxy(url + "/v1") as proxy, sdk(proxy) as client:
        model = client.models.retrieve("Qwen/Qwen2.5-7B-Instruct")
    assert model.id == "Qwen/Qwen2.5-7B-Instruct"
    assert scripted.last.path == "/v1/models/Qwen/Qwen2.5-7B-Instruct"


def test_sse_framing_ends_with_done(proxy_url: str) -> None:
    body = {"model": "ollama:text", "messages": MESSAGES, "stream": True}
    with httpx2.stream("POST", proxy_url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_connections_are_pooled(client: openai.OpenAI, scripted: ScriptedUpstream, stream: bool) -> None:
    before = len(scripted.requests)
    for _ in range(5):
        if stream:
            list(client.chat.completions.create(model="vllm:text", messages=MESSAGES, stream=True))
        else:
            client.chat.completions.create(model="vllm:text", messages=MESSAGES)
    peers = {r.peer for r in scripted.requests[before:]}
    assert len(peers) == 1, "each request opened a new upstream connection"


def test_max_completion_tokens_is_also_sent_as_max_tokens(client: openai.OpenAI, scripted: ScriptedUpstream) -> None:
    client.chat.completions.create(model="llamacpp:text", messages=MESSAGES, max_completion_tokens=5)
    sent = scripted.requests[-1].body
    assert sent["max_completion_tokens"] == 5
    assert sent["max_tokens"] == 5
