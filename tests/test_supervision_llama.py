"""Supervision in front of a real llama.cpp server with the PyPI-shipped model, through the official SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from proxy.app import create_app
from proxy.local_model.model import MODEL_ALIAS, LocalModel
from proxy.settings import ProxySettings
from tests.servers import serve_in_thread
from tests.supervision_harness import LOOKED_UP, TOOLS, sdk

pytestmark = pytest.mark.llama

# llama-cpp-python refuses a null ``content`` next to ``tool_calls`` (the proxy adapts it; the direct call cannot).
CONVERSATION: Any = [{**m, "content": m.get("content") or ""} for m in LOOKED_UP]
SDK_TOOLS: Any = TOOLS
FORCE_CANCEL: Any = {"type": "function", "function": {"name": "cancel_reservation"}}
FORCE_LOOKUP: Any = {"type": "function", "function": {"name": "get_reservation_details"}}
DECLARED = {t["function"]["name"] for t in TOOLS}


@pytest.fixture(scope="module")
def proxies(llama_server: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, openai.OpenAI]]:
    """The model directly, and through the proxy in each mode (every agent on, a roomy budget)."""
    profile = tmp_path_factory.mktemp("profile") / "profile.yaml"
    agents = ["DCE", "TSA", "TOR", "Planner", "Verifier", "Memory"]
    profile.write_text(yaml.safe_dump({"agents": agents, "deadline_ms": 5_000, "max_retries": 1}))
    clients: dict[str, openai.OpenAI] = {"direct": openai.OpenAI(base_url=llama_server.base_url, api_key="x")}
    with (
        serve_in_thread(create_app(_settings(llama_server, profile, "observe"))) as observe,
        serve_in_thread(create_app(_settings(llama_server, profile, "enforce"))) as enforce,
        sdk(observe) as observe_client,
        sdk(enforce) as enforce_client,
        clients["direct"],
    ):
        clients["observe"] = observe_client.with_options(timeout=120)
        clients["enforce"] = enforce_client.with_options(timeout=120)
        yield clients


def _settings(model: LocalModel, profile: Path, mode: str) -> ProxySettings:
    return ProxySettings(upstream_url=model.base_url, profile=str(profile), mode=mode)


def test_injected_context_reaches_the_model(proxies: dict[str, openai.OpenAI]) -> None:
    ask = {"model": MODEL_ALIAS, "messages": CONVERSATION, "tools": SDK_TOOLS, "temperature": 0, "max_tokens": 1}
    direct = proxies["direct"].chat.completions.create(**ask)
    proxied = proxies["observe"].chat.completions.create(**ask)
    assert direct.usage is not None
    assert proxied.usage is not None
    # The context message (Verifier, DCE, TOR, Memory, ... for this conversation) is in the prompt the model read.
    assert proxied.usage.prompt_tokens > direct.usage.prompt_tokens + 40


def test_forced_unconfirmed_write_is_retried_then_blocked(proxies: dict[str, openai.OpenAI]) -> None:
    raw = proxies["enforce"].chat.completions.with_raw_response.create(
        model=MODEL_ALIAS,
        messages=CONVERSATION,
        tools=SDK_TOOLS,
        tool_choice=FORCE_CANCEL,
        temperature=0,
        max_tokens=60,
    )
    # Forced to call the write tool, the model cannot ask for confirmation: every attempt is rejected.
    labels = raw.headers["x-fama-intervention"].split(",")
    assert labels[0].startswith("retry:")
    assert labels[-1].startswith("block:")
    message = raw.parse().choices[0].message
    assert message.tool_calls is None
    assert message.content is not None
    assert "cancel reservation" in message.content  # the held action in plain words, not the tool's name
    assert "cancel_reservation" not in message.content


@pytest.mark.parametrize("stream", [False, True])
def test_enforced_lookup_reaches_the_client_well_formed(proxies: dict[str, openai.OpenAI], stream: bool) -> None:
    ask: dict[str, Any] = {
        "model": MODEL_ALIAS,
        "messages": CONVERSATION[:2],
        "tools": SDK_TOOLS,
        "tool_choice": FORCE_LOOKUP,
        "temperature": 0,
        "max_tokens": 60,
    }
    if stream:
        chunks = list(proxies["enforce"].chat.completions.create(**ask, stream=True))
        assert len({c.id for c in chunks}) == 1
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        names = [
            tc.function.name for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or () if tc.function
        ]
        arguments = "".join(
            tc.function.arguments or ""
            for c in chunks
            if c.choices
            for tc in c.choices[0].delta.tool_calls or ()
            if tc.function
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        message = proxies["enforce"].chat.completions.create(**ask).choices[0].message
        calls = [c for c in message.tool_calls or () if isinstance(c, ChatCompletionMessageFunctionToolCall)]
        names = [c.function.name for c in calls]
        arguments = "".join(c.function.arguments for c in calls)
        text = message.content or ""
    # Whatever the small model produced, what reaches the client is a declared tool with a JSON object for
    # arguments (as produced, repaired, or retried), or the proxy's own message when it gave up.
    if names:
        assert set(names) <= DECLARED
        assert len(names) == 1
        assert isinstance(json.loads(arguments), dict)
    else:
        assert "get reservation details" in text


QUOTE_SIGNS = ("[FAMA", "[/FAMA", "## DCE", "## Verifier", "## Memory", "## Planner", "## TSA", "## TOR", "## Correct")


def test_a_reply_quoting_the_injected_context_never_reaches_the_client(proxies: dict[str, openai.OpenAI]) -> None:
    # Asked through the Responses API as an Agents SDK app asks, this model reads the injected block back.
    ask: dict[str, Any] = {
        "model": MODEL_ALIAS,
        "instructions": LOOKED_UP[0]["content"],
        "input": [{"role": "user", "content": "Please cancel my reservation ZFA04Y."}],
        "tools": [{"type": "function", **t["function"]} for t in TOOLS],
        "temperature": 0,
        "max_output_tokens": 200,
    }
    observed = proxies["observe"].responses.create(**ask, extra_headers={"X-FAMA-Session": "quote-observe"})
    assert any(sign in observed.output_text for sign in QUOTE_SIGNS)  # observe mode leaves the answer as it was
    enforced = proxies["enforce"].responses.with_raw_response.create(
        **ask, extra_headers={"X-FAMA-Session": "quote-enforce"}
    )
    text = enforced.parse().output_text
    assert not any(sign in text for sign in QUOTE_SIGNS)
    assert "strip:context" in enforced.headers["x-fama-intervention"].split(",")
    events = list(proxies["enforce"].responses.create(**ask, stream=True, extra_headers={"X-FAMA-Session": "q-s"}))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert not any(sign in streamed for sign in QUOTE_SIGNS)
