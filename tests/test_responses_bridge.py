"""The Responses API bridged to a chat-only model server: official SDK -> proxy (uvicorn) -> scripted model (uvicorn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.openapi_schemas import openapi_errors
from tests.proxy_harness import running_proxy
from tests.proxy_harness import sdk as strict_sdk
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel, call
from tests.supervision_harness import proxy_for

TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SDK_TOOLS: Any = [TOOL]
WEATHER = call("get_weather", '{"city": "Paris"}', "call_w1")
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def weather_then_answer(body: dict[str, Any]) -> dict[str, Any]:
    """Looks the weather up when asked, and answers once the tool said."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return {"content": f"It is {json.loads(last['content'])['sky']} in Paris."}
    if body.get("tools"):
        return {"content": "Let me check.", "tool_calls": [WEATHER]}
    return {"content": "Hello there, friend!"}


@pytest.fixture
def proxied(tmp_path: Path) -> Any:
    model = ScriptedModel(weather_then_answer)
    with proxy_for(model, tmp_path) as (client, _):
        yield client, model, str(client.base_url).rstrip("/")


def test_create_answers_a_spec_valid_response(proxied: Any, openai_schemas: Path) -> None:
    client, model, _ = proxied
    raw = client.responses.with_raw_response.create(model="m", input="Hi!", instructions="Be brief.")
    response = raw.parse()
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "Hello there, friend!"
    assert response.instructions == "Be brief."
    assert response.usage is not None
    assert response.usage.total_tokens == 15
    assert raw.headers["x-fama-session"]
    assert model.bodies()[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    assert openapi_errors(openai_schemas, "Response", json.loads(raw.content)) == []


def test_function_tools_give_function_call_items_and_their_output_goes_back(proxied: Any) -> None:
    client, model, _ = proxied
    first = client.responses.create(model="m", input="Weather in Paris?", tools=[TOOL])
    message, tool_call = first.output
    assert message.type == "message"
    assert isinstance(tool_call, ResponseFunctionToolCall)
    assert (tool_call.call_id, tool_call.name, tool_call.arguments) == ("call_w1", "get_weather", '{"city": "Paris"}')
    assert model.bodies()[-1]["tools"] == [
        {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
    ]

    second = client.responses.create(
        model="m",
        previous_response_id=first.id,
        tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": "call_w1", "output": json.dumps({"sky": "sunny"})}],
    )
    assert second.output_text == "It is sunny in Paris."
    assert second.previous_response_id == first.id
    sent = model.bodies()[-1]["messages"]
    assert [m["role"] for m in sent if not str(m.get("content") or "").startswith("[FAMA")] == [
        "user",
        "assistant",
        "tool",
    ]
    assert sent[-2]["tool_calls"][0]["id"] == "call_w1"


def test_stream_sends_every_event_in_order_under_one_id(proxied: Any, openai_schemas: Path) -> None:
    client, _, base = proxied
    with httpx2.stream(
        "POST", base + "/responses", json={"model": "m", "input": "Weather?", "tools": [TOOL], "stream": True}
    ) as raw:
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line.startswith(("event: ", "data: "))]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    assert {e["response"]["id"] for e in events if "response" in e} == {events[0]["response"]["id"]}
    for event in events:
        assert openapi_errors(openai_schemas, "ResponseStreamEvent", event) == [], event
        EVENTS.validate_python(event)

    with client.responses.stream(model="m", input="Weather?", tools=[TOOL]) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "Let me check."
    assert final.output_text == "Let me check."
    [tool_call] = [o for o in final.output if o.type == "function_call"]
    assert tool_call.arguments == '{"city": "Paris"}'
    stored = client.responses.retrieve(final.id)
    assert stored.model_dump(exclude={"output"}) == final.model_dump(exclude={"output"})
    assert [o.id for o in stored.output] == [o.id for o in final.output]
    assert stored.output_text == final.output_text
    [stored_call] = [o for o in stored.output if isinstance(o, ResponseFunctionToolCall)]
    assert (stored_call.call_id, stored_call.arguments) == (tool_call.call_id, tool_call.arguments)


def test_retrieve_input_items_delete_and_cancel(proxied: Any) -> None:
    client, _, _ = proxied
    items: Any = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    created = client.responses.create(model="m", input=items)
    assert client.responses.retrieve(created.id).output_text == created.output_text

    listed = client.responses.input_items.list(created.id)
    assert [i.content[0].text for i in listed.data if i.type == "message"] == ["three", "two", "one"]
    page = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data if i.type == "message"] == ["one", "two"]
    assert page.has_more is True
    rest = client.responses.input_items.list(created.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data if i.type == "message"] == ["three"]

    with pytest.raises(openai.BadRequestError) as not_cancellable:
        client.responses.cancel(created.id)
    assert not_cancellable.value.code == "response_not_cancellable"

    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(created.id)


def test_unknown_previous_response_and_unbridgeable_requests_are_clear_errors(proxied: Any) -> None:
    client, model, _ = proxied
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="m", input="x", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as web:
        client.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
    assert web.value.body["param"] == "tools[0].type"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as typed:
        client.responses.create(model="m", input=42)
    assert typed.value.body["param"] == "input"  # type: ignore[index]
    assert model.bodies() == []


def test_store_false_is_not_kept(proxied: Any) -> None:
    client, _, _ = proxied
    created = client.responses.create(model="m", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_a_chain_is_one_session_even_when_its_instructions_change(proxied: Any) -> None:
    client, _, _ = proxied
    first = client.responses.with_raw_response.create(model="m", input="Weather?", instructions="A", tools=[TOOL])
    second = client.responses.with_raw_response.create(
        model="m",
        instructions="B, quite different",
        previous_response_id=first.parse().id,
        tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": "call_w1", "output": '{"sky": "grey"}'}],
    )
    assert second.parse().output_text == "It is grey in Paris."
    assert second.headers["x-fama-session"] == first.headers["x-fama-session"]


@pytest.mark.parametrize("style", ["openai", "vllm", "ollama", "llamacpp", "tgi"])
def test_upstream_failures_reach_the_sdk_as_errors(style: str) -> None:
    with (
        serve_in_thread(ScriptedUpstream().app) as upstream,
        running_proxy(upstream + "/v1") as proxy,
        strict_sdk(proxy) as client,
    ):
        with pytest.raises(openai.RateLimitError) as limited:
            client.responses.create(model=f"{style}:error-429", input="x")
        assert limited.value.response.headers["retry-after"] == "7"
        with pytest.raises(openai.APIError), client.responses.stream(model=f"{style}:midstream-error", input="x") as s:
            for _ in s:
                pass
        # A good answer still validates strictly, whatever the server's quirks.
        answer = client.responses.create(model=f"{style}:tool", input="x", tools=SDK_TOOLS)
        assert [o.type for o in answer.output if o.type == "function_call"] == ["function_call"]


def test_a_stored_response_streams_again_on_retrieve(proxied: Any, openai_schemas: Path) -> None:
    client, _, _ = proxied
    created = client.responses.create(model="m", input="Weather?", tools=[TOOL])
    events = list(client.responses.retrieve(created.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.id == created.id
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == created.output_text
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == '{"city": "Paris"}'
    for event in events:
        assert openapi_errors(openai_schemas, "ResponseStreamEvent", event.model_dump(exclude_unset=True)) == []
    later = list(client.responses.retrieve(created.id, stream=True, starting_after=len(events) - 2))
    assert [e.sequence_number for e in later] == [len(events) - 1]


def test_a_tenant_sees_only_its_own_responses(tmp_path: Path) -> None:
    model = ScriptedModel(weather_then_answer)
    with proxy_for(model, tmp_path, api_keys="key-a,key-b") as (client, _):
        alice = client.with_options(api_key="key-a")
        bob = client.with_options(api_key="key-b")
        created = alice.responses.create(model="m", input="Hi!")
        assert alice.responses.retrieve(created.id).id == created.id
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model="m", input="more", previous_response_id=created.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.delete(created.id)
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="nobody").responses.retrieve(created.id)
