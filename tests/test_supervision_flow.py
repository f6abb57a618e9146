"""Supervision end to end, embedded detectors: official SDK → proxy (uvicorn) → scripted model (uvicorn)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function

from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import Mode, Profile
from detector_service.contract.wire import Action, Category, TurnEvent
from detector_service.engine import Engine
from proxy.app import create_app
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.supervision.sessions import MemorySessionStore
from proxy.supervision.supervisor import Supervisor
from proxy.supervision.verdicts import EmbeddedVerdicts, VerdictOutcome
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel, call, context_in, feedback_in
from tests.supervision_harness import (
    CANCEL,
    LOOKED_UP,
    QUESTION,
    TOOLS,
    always_cancels,
    cancels_until_told,
    interventions,
    proxy_for,
    sdk,
)

ENFORCE = {"mode": "enforce"}


def _stream(client: openai.OpenAI, messages: list[Any]) -> list[ChatCompletionChunk]:
    stream = client.chat.completions.create(
        model="m", messages=messages, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    return list(stream)


def _assert_coherent(chunks: list[ChatCompletionChunk]) -> None:
    """One id, one role delta, exactly one finish_reason, usage last."""
    assert len({c.id for c in chunks}) == 1
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    assert len(roles) == 1
    assert chunks.index(roles[0]) == 0
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None


def _fn(tool_call: object) -> Function:
    assert isinstance(tool_call, ChatCompletionMessageFunctionToolCall)
    return tool_call.function


def _text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _tool_deltas(chunks: list[ChatCompletionChunk]) -> list[Any]:
    return [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]


def test_enforce_retries_an_unconfirmed_write_and_the_client_gets_only_the_question(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        completion = raw.parse()
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        assert raw.headers["x-fama-session"].startswith("c-")
        assert "x-fama-degraded" not in raw.headers
        message = completion.choices[0].message
        assert message.content == QUESTION
        assert message.tool_calls is None
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.total_tokens == 30  # both attempts are paid for

        first, retry = model.bodies()
        assert feedback_in(first) is None
        feedback = feedback_in(retry)
        assert feedback is not None
        assert "`cancel_reservation` (reservation_id: ZFA04Y)" in feedback
        assert "[DCV]" in feedback
        assert retry["messages"][:-1] == first["messages"]  # the feedback is appended for the retry only

        [recorded] = interventions(app)
        assert recorded.action is Action.RETRY
        assert recorded.categories == [Category.DCV]
        assert recorded.original["tool_calls"][0]["function"]["name"] == "cancel_reservation"
        assert recorded.final is None
        metrics = app.metrics.registry
        assert metrics.get_sample_value("fama_retries_total", {"category": "DCV", "outcome": "fixed"}) == 1
        labels = {"action": "retry", "category": "DCV", "mode": "enforce", "api": "chat"}
        assert metrics.get_sample_value("fama_interventions_total", labels) == 1


def test_enforce_stream_retries_and_sends_one_coherent_stream(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        chunks = _stream(client, LOOKED_UP)
        _assert_coherent(chunks)
        assert _text(chunks) == QUESTION
        assert _tool_deltas(chunks) == []  # no byte of the rejected tool call reached the client
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert final.choices[0].finish_reason == "stop"
        assert final.model_extra is not None
        assert final.model_extra["fama"]["intervention"] == "retry:DCV"
        assert final.model_extra["fama"]["session"].startswith("c-")
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == 30
        assert len(model.bodies()) == 2
        assert [i.action for i in interventions(app)] == [Action.RETRY]


def test_observe_passes_untouched_and_the_next_turn_carries_the_guidance(tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path, mode="observe") as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        completion = raw.parse()
        assert "x-fama-intervention" not in raw.headers
        calls = completion.choices[0].message.tool_calls
        assert calls is not None
        assert _fn(calls[0]).name == "cancel_reservation"
        assert len(model.bodies()) == 1
        assert "[DCV]" not in (context_in(model.bodies()[0]) or "")

        # The app runs the call and continues the same conversation (same derived session).
        assistant = completion.choices[0].message.model_dump(exclude_none=True)
        follow_up = [
            *LOOKED_UP,
            assistant,
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"status": "cancelled"}'},
        ]
        second = client.chat.completions.with_raw_response.create(model="m", messages=follow_up, tools=TOOLS)
        assert second.headers["x-fama-session"] == raw.headers["x-fama-session"]
        context = context_in(model.bodies()[1])
        assert context is not None
        assert "## Correction from the previous turn" in context
        assert "[DCV]" in context
        assert "cancel_reservation" in context
        assert interventions(app) == []  # observe mode changes nothing
        registry = app.metrics.registry
        labels = {"category": "DCV", "detector": "write_without_confirmation", "tool": "cancel_reservation"}
        # At least the first turn's finding (the second turn's evaluation may still be running).
        assert (registry.get_sample_value("fama_findings_total", labels) or 0) >= 1


def test_malformed_arguments_are_repaired_without_a_retry(tmp_path: Path) -> None:
    model = ScriptedModel(
        lambda body: {"tool_calls": [call("get_reservation_details", "{'reservation_id': 'ZFA04Y'}")]}
    )
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP[:2], tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "rewrite:MTC"
        calls = raw.parse().choices[0].message.tool_calls
        assert calls is not None
        assert json.loads(_fn(calls[0]).arguments) == {"reservation_id": "ZFA04Y"}
        assert calls[0].id == "call_1"
        assert len(model.bodies()) == 1
        [recorded] = interventions(app)
        assert recorded.action is Action.REWRITE
        assert recorded.final is not None

        chunks = _stream(client, LOOKED_UP[:2])
        _assert_coherent(chunks)
        deltas = _tool_deltas(chunks)
        assert len(deltas) == 1
        assert json.loads(deltas[0].function.arguments) == {"reservation_id": "ZFA04Y"}


def test_unknown_tool_is_retried(tmp_path: Path) -> None:
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        name = "get_reservation_details" if feedback_in(body) else "get_reservation"
        return {"tool_calls": [call(name, '{"reservation_id": "ZFA04Y"}')]}

    model = ScriptedModel(reply)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP[:2], tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "retry:MTC"
        calls = raw.parse().choices[0].message.tool_calls
        assert calls is not None
        assert _fn(calls[0]).name == "get_reservation_details"
        feedback = feedback_in(model.bodies()[1])
        assert feedback is not None
        assert "'get_reservation' does not exist" in feedback


def test_block_when_retries_are_exhausted(tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path, mode="enforce", profile={"max_retries": 1}) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "retry:DCV,block:DCV"
        completion = raw.parse()
        assert completion.choices[0].message.tool_calls is None
        assert completion.choices[0].message.content == (
            "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?"
        )
        assert len(model.bodies()) == 2
        assert [i.action for i in interventions(app)] == [Action.RETRY, Action.BLOCK]
        registry = app.metrics.registry
        assert registry.get_sample_value("fama_retries_total", {"category": "DCV", "outcome": "exhausted"}) == 1

        chunks = _stream(client, LOOKED_UP)
        _assert_coherent(chunks)
        assert _tool_deltas(chunks) == []
        assert _text(chunks) == "Before I cancel reservation ZFA04Y, can you confirm you want me to go ahead?"


def test_plain_chat_without_tools_is_not_supervised(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": "Hello!"})
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP[:2])
        assert raw.parse().choices[0].message.content == "Hello!"
        assert model.bodies()[0]["messages"] == LOOKED_UP[:2]  # nothing injected
        assert "x-fama-intervention" not in raw.headers
        assert raw.headers["x-fama-session"].startswith("c-")


def test_session_header_names_the_session_and_text_streams_through(tmp_path: Path) -> None:
    model = ScriptedModel(lambda body: {"content": QUESTION})
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        stream = client.chat.completions.with_raw_response.create(
            model="m", messages=LOOKED_UP, tools=TOOLS, stream=True, extra_headers={"X-FAMA-Session": "conv-7"}
        )
        assert stream.headers["x-fama-session"] == "conv-7"
        chunks = list(stream.parse())
        assert _text(chunks) == QUESTION
        assert CANCEL["function"]["name"] not in json.dumps([c.model_dump() for c in chunks])


class GatedVerdicts(EmbeddedVerdicts):
    """The real detectors, but the verdict is only given once the test opens the gate."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.asked = threading.Event()
        self.gate = threading.Event()

    async def evaluate(self, turn: TurnEvent, timeout_s: float) -> VerdictOutcome:
        self.asked.set()
        await asyncio.to_thread(self.gate.wait, 20)
        return await super().evaluate(turn, timeout_s)


def test_stream_sends_content_before_the_verdict_and_tool_calls_only_after(tmp_path: Path) -> None:
    lookup = call("get_reservation_details", '{"reservation_id": "ZFA04Y"}')
    text = "Let me look that reservation up for you."
    model = ScriptedModel(lambda body: {"content": text, "tool_calls": [lookup]})
    profile = Profile(deadline_ms=30_000)
    verdicts = GatedVerdicts(Engine(profile))
    supervisor = Supervisor(Mode.ENFORCE, ProfileHolder.of(profile), verdicts, MemorySessionStore(), ProxyMetrics())
    received: list[ChatCompletionChunk] = []
    with serve_in_thread(model.app) as upstream:
        app = create_app(ProxySettings(upstream_url=upstream + "/v1"), hooks=supervisor)
        with serve_in_thread(app) as url, sdk(url) as client:
            stream = client.chat.completions.create(model="m", messages=LOOKED_UP[:2], tools=TOOLS, stream=True)
            reader = threading.Thread(target=lambda: received.extend(stream), daemon=True)
            reader.start()
            assert verdicts.asked.wait(10)
            deadline = time.monotonic() + 10
            while _text(list(received)) != text and time.monotonic() < deadline:
                time.sleep(0.01)
            # The whole text is with the client while the verdict does not exist yet; no tool-call byte is.
            assert _text(list(received)) == text
            assert _tool_deltas(list(received)) == []
            assert not verdicts.gate.is_set()
            verdicts.gate.set()
            reader.join(10)
            assert not reader.is_alive()
    _assert_coherent_without_usage(received)
    deltas = _tool_deltas(received)
    assert [d.function.name for d in deltas if d.function] == ["get_reservation_details"]
    first_tool = next(i for i, c in enumerate(received) if c.choices and c.choices[0].delta.tool_calls)
    last_text = max(i for i, c in enumerate(received) if c.choices and c.choices[0].delta.content)
    assert last_text < first_tool
    final = received[-1]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.model_extra is not None
    assert "intervention" not in final.model_extra["fama"]


def _assert_coherent_without_usage(chunks: list[ChatCompletionChunk]) -> None:
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_streamed_retry_after_text_tells_the_model_what_the_user_saw(tmp_path: Path) -> None:
    said = "Sure, cancelling it now."

    def reply(body: dict[str, Any]) -> dict[str, Any]:
        if feedback_in(body):
            return {"content": " " + QUESTION}
        return {"content": said, "tool_calls": [CANCEL]}

    model = ScriptedModel(reply)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, _):
        chunks = _stream(client, LOOKED_UP)
        _assert_coherent(chunks)
        assert _text(chunks) == said + " " + QUESTION
        assert _tool_deltas(chunks) == []
        feedback = feedback_in(model.bodies()[1])
        assert feedback is not None
        assert f'The user has already seen this text from you: "{said}"' in feedback


def test_observe_stream_is_relayed_untouched_and_judged_after_it_ends(tmp_path: Path) -> None:
    model = ScriptedModel(always_cancels)
    with proxy_for(model, tmp_path, mode="observe") as (client, _):
        chunks = _stream(client, LOOKED_UP)
        deltas = _tool_deltas(chunks)
        assert deltas[0].function is not None
        assert deltas[0].function.name == "cancel_reservation"
        assert "".join(d.function.arguments or "" for d in deltas if d.function) == CANCEL["function"]["arguments"]
        assert len(deltas) > 1  # the upstream's own pieces, not re-assembled
        # Only the finish chunk carries the supervisor's metadata, as in enforce mode; nothing was changed.
        [tagged] = [c for c in chunks if (c.model_extra or {}).get("fama")]
        assert tagged.choices[0].finish_reason == "tool_calls"
        assert tagged.model_extra is not None
        assert set(tagged.model_extra["fama"]) == {"session"}

        follow_up = [*LOOKED_UP, {"role": "assistant", "content": None, "tool_calls": [CANCEL]}]
        follow_up.append({"role": "tool", "tool_call_id": CANCEL["id"], "content": '{"status": "cancelled"}'})
        client.chat.completions.create(model="m", messages=follow_up, tools=TOOLS)
        context = context_in(model.bodies()[1])
        assert context is not None
        assert "[DCV]" in context


def _silent_until_told(body: dict[str, Any]) -> dict[str, Any]:
    """Answers nothing at all (qwen2.5-7b does this), until the proxy's feedback asks it to go on."""
    return {"content": QUESTION} if feedback_in(body) else {"content": ""}


def test_enforce_retries_an_empty_reply(tmp_path: Path) -> None:
    model = ScriptedModel(_silent_until_told)
    with proxy_for(model, tmp_path, **ENFORCE) as (client, app):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
        assert raw.headers["x-fama-intervention"] == "retry:IFU"
        assert raw.parse().choices[0].message.content == QUESTION
        feedback = feedback_in(model.bodies()[1])
        assert feedback is not None
        assert "empty" in feedback
        # Streamed: an empty reply sent the client nothing, so it can still be retried.
        chunks = _stream(client, LOOKED_UP)
        _assert_coherent(chunks)
        assert _text(chunks) == QUESTION
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert final.model_extra is not None
        assert final.model_extra["fama"]["intervention"] == "retry:IFU"
        assert [i.categories for i in interventions(app)] == [[Category.IFU], [Category.IFU]]
