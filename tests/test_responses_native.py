"""The native path: an upstream that serves ``/v1/responses`` itself. Unsupervised requests and reads of its own
responses are forwarded as they are; turns with function tools are supervised (here under enforce)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.app import create_app
from proxy.settings import ProxySettings
from tests.native_upstream import NativeModel, feedback_in
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import QUESTION, RESERVATION, SYSTEM, TOOLS, sdk

RESPONSES_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]
LOOKED_UP: list[Any] = [
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "type": "function_call",
        "call_id": "call_0",
        "name": "get_reservation_details",
        "arguments": '{"reservation_id": "ZFA04Y"}',
    },
    {"type": "function_call_output", "call_id": "call_0", "output": json.dumps(RESERVATION)},
]
CANCEL = ("cancel_reservation", '{"reservation_id": "ZFA04Y"}')


def cancels_until_told(body: dict[str, Any]) -> dict[str, Any]:
    if feedback_in(body):
        return {"text": QUESTION}
    if not body.get("tools"):
        return {"text": "Hello from the native server."}
    return {"calls": [CANCEL]}


@contextlib.contextmanager
def proxy(app_of_upstream: Any, tmp_path: Path, **settings: Any) -> Iterator[openai.OpenAI]:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({}))
    with serve_in_thread(app_of_upstream) as upstream:
        app = create_app(ProxySettings(upstream_url=upstream + "/v1", profile=str(path), **settings))
        with serve_in_thread(app) as url, sdk(url) as client:
            yield client


def test_auto_probes_once_and_forwards_what_it_does_not_supervise(tmp_path: Path) -> None:
    model = NativeModel(cancels_until_told)
    with proxy(model.app, tmp_path) as client:
        body = {"model": "m", "input": "Hi", "metadata": {"k": "v"}, "truncation": "auto"}
        first = client.responses.create(model="m", input="Hi", metadata={"k": "v"}, truncation="auto")
        assert first.id == "resp_native_1"
        assert first.output_text == "Hello from the native server."
        with client.responses.stream(model="m", input="Hi") as stream:
            streamed = stream.get_final_response()
        assert streamed.id == "resp_native_2"
        probe, forwarded, _ = model.creates()
        assert probe == {}  # the one probe: an empty create, answered 400 by a server that has the route
        assert forwarded == body  # as the client sent it

        assert client.responses.retrieve(first.id).id == first.id
        client.responses.input_items.list(first.id, limit=5, order="asc")
        assert ("GET", f"/v1/responses/{first.id}/input_items?limit=5&order=asc", None) in model.requests
        assert client.responses.cancel(first.id).status == "cancelled"
        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
        assert len(model.creates()) == 3  # no second probe


def test_native_turn_with_tools_is_supervised(tmp_path: Path) -> None:
    model = NativeModel(cancels_until_told)
    with proxy(model.app, tmp_path, mode="enforce", upstream_responses="native") as client:
        raw = client.responses.with_raw_response.create(
            model="m", instructions=SYSTEM, input=LOOKED_UP, tools=RESPONSES_TOOLS
        )
        asked = raw.parse()
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        assert asked.output_text == QUESTION
        assert [o.type for o in asked.output] == ["message"]
        rejected, retry = model.creates()
        assert feedback_in(rejected) is None
        assert "cancel_reservation" in str(feedback_in(retry))
        assert rejected["tools"] == RESPONSES_TOOLS  # the client's own parameters
        assert rejected["input"][0] == {"type": "message", "role": "system", "content": SYSTEM}
        # What the client got is the supervised answer, kept by the proxy under its own id.
        assert client.responses.retrieve(asked.id).output_text == QUESTION

        with client.responses.stream(
            model="m",
            instructions=SYSTEM,
            input=[{"role": "user", "content": "Yes, go ahead."}],
            tools=RESPONSES_TOOLS,
            previous_response_id=asked.id,
        ) as stream:
            kinds = [e.type for e in stream]
            confirmed = stream.get_final_response()
        assert "response.function_call_arguments.done" in kinds
        assert [(o.type, getattr(o, "name", None)) for o in confirmed.output] == [
            ("function_call", "cancel_reservation")
        ]
        chained = model.creates()[-1]
        assert "previous_response_id" not in chained  # the chain is the proxy's: the whole conversation is sent
        assert [i.get("role") or i["type"] for i in chained["input"] if "FAMA" not in str(i.get("content"))] == [
            "system",
            "user",
            "function_call",
            "function_call_output",
            "assistant",
            "user",
        ]


def test_bridge_setting_and_a_chat_only_upstream_use_chat_completions(tmp_path: Path) -> None:
    native = NativeModel(cancels_until_told)
    with proxy(native.app, tmp_path, upstream_responses="bridge") as client:
        with pytest.raises(openai.APIStatusError):
            client.responses.create(model="m", input="Hi")  # no chat route on this server
        assert native.creates() == []
    chat = ScriptedModel(lambda body: {"content": "from chat"})
    with proxy(chat.app, tmp_path) as client:
        assert client.responses.create(model="m", input="Hi").output_text == "from chat"
        assert client.responses.create(model="m", input="Hi again").output_text == "from chat"
        assert len(chat.bodies()) == 2


def test_a_probe_answered_by_an_overloaded_upstream_decides_nothing(tmp_path: Path) -> None:
    model = NativeModel(cancels_until_told)
    overloaded = [True]

    async def create(request: Request) -> Response:
        if overloaded.pop() if overloaded else False:
            return JSONResponse({"error": {"message": "busy", "type": "server_error"}}, 503)
        return await model.create(request)

    app = Starlette(routes=[Route("/v1/responses", create, methods=["POST"])])
    with proxy(app, tmp_path) as client:
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model="m", input="Hi")
        assert client.responses.create(model="m", input="Hi").output_text == "Hello from the native server."


def test_a_forwarded_create_is_the_native_servers_to_judge(tmp_path: Path) -> None:
    """The API requires no field: what a create lacks is for the server that answers it to say."""
    model = NativeModel(cancels_until_told)
    with (
        proxy(model.app, tmp_path, upstream_responses="native") as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.responses.create(input="Hi")
    assert caught.value.message.endswith("model is required")
    assert model.creates() == [{"input": "Hi"}]


def test_a_turn_the_proxy_runs_itself_needs_a_model_and_input(tmp_path: Path) -> None:
    chat = ScriptedModel(lambda body: {"content": "from chat"})
    with proxy(chat.app, tmp_path, upstream_responses="bridge") as client:
        with pytest.raises(openai.BadRequestError) as no_model:
            client.responses.create(input="Hi")
        with pytest.raises(openai.BadRequestError) as no_input:
            client.responses.create(model="m")
    assert no_model.value.param == "model"
    assert no_input.value.param == "input"
    assert chat.bodies() == []


def test_a_native_stream_that_fails_is_an_error_the_sdk_raises(tmp_path: Path) -> None:
    model = NativeModel(lambda body: {"fail": True})
    with (
        proxy(model.app, tmp_path, mode="enforce", upstream_responses="native") as client,
        pytest.raises(openai.APIError, match="the GPU fell over"),
        client.responses.stream(model="m", input="Hi", tools=RESPONSES_TOOLS) as stream,
    ):
        for _ in stream:
            pass
