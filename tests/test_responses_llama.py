"""The Responses API in front of a real llama.cpp server (chat completions only) with the PyPI-shipped model: the
official SDK and an Agents SDK app, through the bridge the proxy picks by itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from agents import Agent, ModelSettings, RunConfig, Runner, function_tool
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from proxy.app import create_app
from proxy.local_model.model import MODEL_ALIAS, LocalModel
from proxy.settings import ProxySettings
from tests.openapi_schemas import openapi_errors
from tests.servers import serve_in_thread
from tests.supervision_harness import LOOKED_UP_ITEMS, RESERVATION, RESPONSES_TOOLS, SYSTEM, sdk

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def proxy_url(llama_server: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("profile") / "profile.yaml"
    profile.write_text(yaml.safe_dump({"deadline_ms": 5_000, "max_retries": 1}))
    settings = ProxySettings(upstream_url=llama_server.base_url, profile=str(profile), mode="enforce")
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(proxy_url: str) -> Iterator[openai.OpenAI]:
    with sdk(proxy_url) as c:
        yield c.with_options(timeout=120)


def test_create_stream_retrieve_and_chain(client: openai.OpenAI, openai_schemas: Path) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL_ALIAS, instructions="Answer briefly.", input="Say hello.", max_output_tokens=16, temperature=0
    )
    first = raw.parse()
    assert first.output_text
    assert first.usage is not None
    assert first.usage.input_tokens > 0
    assert openapi_errors(openai_schemas, "Response", json.loads(raw.content)) == []

    with client.responses.stream(
        model=MODEL_ALIAS, input="And goodbye?", previous_response_id=first.id, max_output_tokens=16, temperature=0
    ) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    # Sixteen tokens may cut the answer: then the stream ends incomplete, as OpenAI's does.
    assert last.type in ("response.completed", "response.incomplete")
    second = last.response
    assert second.output_text == deltas
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == deltas
    [item] = client.responses.input_items.list(second.id).data
    assert item.type == "message"


def test_forced_unconfirmed_write_is_retried_then_blocked(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL_ALIAS,
        instructions=SYSTEM,
        input=LOOKED_UP_ITEMS,
        tools=RESPONSES_TOOLS,
        tool_choice={"type": "function", "name": "cancel_reservation"},
        temperature=0,
        max_output_tokens=60,
    )
    labels = raw.headers["x-fama-intervention"].split(",")
    assert labels[0].startswith("retry:")
    assert labels[-1].startswith("block:")
    blocked = raw.parse()
    assert [o.type for o in blocked.output] == ["message"]
    assert "cancel reservation" in blocked.output_text  # the held action in plain words, not the tool's name
    assert "cancel_reservation" not in blocked.output_text


async def test_agents_sdk_runs_its_function_tool(proxy_url: str) -> None:
    looked_up: list[str] = []

    @function_tool
    def get_reservation_details(reservation_id: str) -> str:
        """Get the details of a reservation."""
        looked_up.append(reservation_id)
        return json.dumps(RESERVATION)

    async with AsyncOpenAI(base_url=proxy_url + "/v1", api_key="x", max_retries=0, timeout=120) as openai_client:
        agent = Agent(
            name="airline",
            instructions="You look reservations up.",
            tools=[get_reservation_details],
            model=OpenAIResponsesModel(model=MODEL_ALIAS, openai_client=openai_client),
            # Forced on the first turn (a 135M model rarely calls a tool by itself), then free to answer.
            model_settings=ModelSettings(tool_choice="get_reservation_details", temperature=0, max_tokens=40),
        )
        result = await Runner.run(
            agent, "Show me reservation ZFA04Y.", max_turns=4, run_config=RunConfig(tracing_disabled=True)
        )
    assert looked_up  # the model's call reached the app's function
    assert result.last_response_id is not None
