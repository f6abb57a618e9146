"""An OpenAI Agents SDK app with function tools, unchanged but for its ``base_url``, through the proxy in enforce mode
on a chat-only model server: the unconfirmed cancellation is never executed, the confirmed one is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from tests.supervised_upstream import ScriptedModel, call, feedback_in
from tests.supervision_harness import CANCEL, QUESTION, RESERVATION, SYSTEM, proxy_for

DONE = "Your reservation ZFA04Y is cancelled."
LOOK_UP = call("get_reservation_details", '{"reservation_id": "ZFA04Y"}', "call_0")


def hasty_agent(body: dict[str, Any]) -> dict[str, Any]:
    """Looks the reservation up, then cancels at once; asks first only when the proxy tells it to."""
    if feedback_in(body):
        return {"content": QUESTION}
    last = body["messages"][-1]
    if last["role"] == "tool":
        return {"content": DONE} if "cancelled" in last["content"] else {"tool_calls": [CANCEL]}
    if last["role"] == "user" and "yes" in str(last["content"]).lower():
        return {"tool_calls": [CANCEL]}
    return {"tool_calls": [LOOK_UP]}


def airline_agent(client: AsyncOpenAI, executed: list[str]) -> Agent[Any]:
    @function_tool
    def get_reservation_details(reservation_id: str) -> str:
        """Get the details of a reservation."""
        executed.append(f"get {reservation_id}")
        return json.dumps(RESERVATION)

    @function_tool
    def cancel_reservation(reservation_id: str) -> str:
        """Cancel the whole reservation."""
        executed.append(f"cancel {reservation_id}")
        return json.dumps({"reservation_id": reservation_id, "status": "cancelled"})

    return Agent(
        name="airline",
        instructions=SYSTEM,
        tools=[get_reservation_details, cancel_reservation],
        model=OpenAIResponsesModel(model="m", openai_client=client),  # the app's own client, pointed at the proxy
    )


NO_TRACING = RunConfig(tracing_disabled=True)


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_agents_sdk_run_is_supervised(tmp_path: Path, streamed: bool) -> None:
    model = ScriptedModel(hasty_agent)
    executed: list[str] = []
    with proxy_for(model, tmp_path, mode="enforce") as (sync_client, _):
        base_url = str(sync_client.base_url)
        async with AsyncOpenAI(base_url=base_url, api_key="client-key", max_retries=0, timeout=20) as client:
            agent = airline_agent(client, executed)

            async def run(prompt: str, previous: str | None) -> tuple[Any, str | None]:
                if not streamed:
                    result = await Runner.run(agent, prompt, previous_response_id=previous, run_config=NO_TRACING)
                    return result.final_output, result.last_response_id
                streaming = Runner.run_streamed(agent, prompt, previous_response_id=previous, run_config=NO_TRACING)
                async for _ in streaming.stream_events():
                    pass
                return streaming.final_output, streaming.last_response_id

            answer, last = await run("Please cancel my reservation ZFA04Y.", None)
            assert answer == QUESTION  # the model's hasty cancel was retried into the question
            assert executed == ["get ZFA04Y"]  # ...so the agent never ran the cancellation

            answer, _ = await run("Yes, please cancel it.", last)
            assert answer == DONE
            assert executed == ["get ZFA04Y", "cancel ZFA04Y"]
