"""Upstream faults as the official SDK sees them, its own retries switched on: every SDK attempt is exactly one
upstream attempt (the proxy adds no retry of its own), ``retry-after`` reaches the SDK and paces its retries,
and a supervised turn whose corrective retry hits a fault ends in a clean OpenAI-shaped error, in bounded time.

The status of each fault (500 kept, 429 kept with ``retry-after``, 504 for no answer in time, 502 for no
connection or a body cut short, an SSE error event mid-stream) is pinned per upstream style in
``tests/test_proxy_errors.py``; this module adds the SDK's retries and supervision on top.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.proxy_harness import MESSAGES, running_proxy, sdk
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import refused_url, serve_in_thread
from tests.supervised_upstream import ScriptedModel, feedback_in
from tests.supervision_harness import LOOKED_UP, always_cancels, proxy_for
from tests.supervision_harness import TOOLS as AIRLINE_TOOLS


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedUpstream, str]]:
    upstream = ScriptedUpstream(retry_after="1")
    with serve_in_thread(upstream.app) as url:
        yield upstream, url + "/v1"


def _sent(upstream: ScriptedUpstream, since: int) -> list[float]:
    return [r.at for r in upstream.requests[since:]]


def test_429_retry_after_paces_the_sdks_own_retries_and_the_proxy_adds_none(
    scripted: tuple[ScriptedUpstream, str],
) -> None:
    upstream, url = scripted
    with running_proxy(url) as proxy, sdk(proxy, max_retries=2) as client:
        before = len(upstream.requests)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="openai:error-429", messages=MESSAGES)
        took = time.monotonic() - started
    sent = _sent(upstream, before)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    print(f"\n429 retry-after 1: {len(sent)} upstream requests, gaps {[round(g, 2) for g in gaps]} s")
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    assert len(sent) == 3  # the first attempt and the SDK's two retries, one upstream request each
    assert all(0.9 <= g < 3 for g in gaps)  # the SDK waited what retry-after said
    assert took < 10


@pytest.mark.parametrize(
    ("model", "status", "exc_type"),
    [("openai:error-500", 500, openai.InternalServerError), ("openai:error-503", 503, openai.InternalServerError)],
)
def test_5xx_is_retried_by_the_sdk_only(
    scripted: tuple[ScriptedUpstream, str], model: str, status: int, exc_type: type[openai.APIStatusError]
) -> None:
    upstream, url = scripted
    with running_proxy(url) as proxy, sdk(proxy, max_retries=2) as client:
        before = len(upstream.requests)
        with pytest.raises(exc_type) as caught:
            client.chat.completions.create(model=model, messages=MESSAGES)
    assert caught.value.status_code == status
    assert len(upstream.requests) - before == 3


def test_no_answer_before_headers_is_504_once_per_sdk_attempt(scripted: tuple[ScriptedUpstream, str]) -> None:
    upstream, url = scripted
    with running_proxy(url, read_timeout_s=0.5) as proxy, sdk(proxy, max_retries=1) as client:
        before = len(upstream.requests)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="openai:hang", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["code"]) == ("server_error", "upstream_timeout")
    assert len(upstream.requests) - before == 2


def test_the_sdks_own_timeout_is_api_timeout_error_and_cancels_the_upstream(
    scripted: tuple[ScriptedUpstream, str],
) -> None:
    upstream, url = scripted
    upstream.cancelled.clear()
    with running_proxy(url) as proxy, sdk(proxy, max_retries=0, timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="openai:hang", messages=MESSAGES)
        gave_up_at = time.monotonic()
        assert upstream.cancelled.wait(2), "the upstream request outlived the client"
    assert upstream.cancelled_at is not None
    print(f"\nSDK timeout: upstream cancelled {upstream.cancelled_at - gave_up_at:.3f} s after the client gave up")
    assert upstream.cancelled_at - gave_up_at < 1.0


def test_connection_refused_is_502_once_per_sdk_attempt() -> None:
    with refused_url() as upstream, running_proxy(upstream) as proxy, sdk(proxy, max_retries=2) as client:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES)
        took = time.monotonic() - started
        metrics = httpx2.get(proxy + "/metrics").text
    assert caught.value.status_code == 502
    assert 'fama_upstream_errors_total{kind="connect"} 3.0' in metrics  # one connect per SDK attempt
    assert took < 10  # the SDK's backoff, nothing more


def test_a_stream_cut_mid_way_is_an_sse_error_event_then_api_error(scripted: tuple[ScriptedUpstream, str]) -> None:
    _, url = scripted
    with running_proxy(url) as proxy:
        body = {"model": "openai:drop", "messages": MESSAGES, "stream": True}
        with httpx2.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200
        assert '"error"' in events[-1]
        assert "[DONE]" not in events
        with sdk(proxy, max_retries=2) as client:
            stream = client.chat.completions.create(model="openai:drop", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError) as caught:
                list(stream)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_stream_error"


# -- a supervised turn whose corrective retry hits a fault --------------------------------------------------

FAULTS: dict[str, tuple[int, type[openai.APIStatusError], str | None]] = {
    # fault: (status, SDK exception, error code)
    "500": (500, openai.InternalServerError, None),
    "429": (429, openai.RateLimitError, None),
    "hang": (504, openai.InternalServerError, "upstream_timeout"),
    "drop": (502, openai.InternalServerError, "upstream_unreachable"),
}


def _faults_on_retry(fault: str) -> Any:
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        return {"fault": fault} if feedback_in(body) else always_cancels(body)

    return reply


def _openai_error(exc: openai.APIError) -> dict[str, Any]:
    assert isinstance(exc.body, dict)
    assert set(exc.body) == {"message", "type", "param", "code"}
    return exc.body


def _drain(stream: Any, into: list[Any]) -> None:
    for chunk in stream:
        into.append(chunk)


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_supervised_retry_that_faults_ends_in_a_clean_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    status, exc_type, code = FAULTS[fault]
    model = ScriptedModel(_faults_on_retry(fault))
    with proxy_for(model, tmp_path, mode="enforce", read_timeout_s=0.5) as (client, _):
        started = time.monotonic()
        with pytest.raises(exc_type) as caught:
            client.chat.completions.create(model="m", messages=LOOKED_UP, tools=AIRLINE_TOOLS)
        took = time.monotonic() - started
    assert caught.value.status_code == status
    assert _openai_error(caught.value)["code"] == code
    assert [feedback_in(b) is not None for b in model.bodies()] == [False, True]  # one retry, not repeated
    assert took < 5
    _no_errors_logged(caplog)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_supervised_streamed_retry_that_faults_ends_with_an_error_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    model = ScriptedModel(_faults_on_retry(fault))
    with proxy_for(model, tmp_path, mode="enforce", read_timeout_s=0.5) as (client, _):
        started = time.monotonic()
        stream = client.chat.completions.create(model="m", messages=LOOKED_UP, tools=AIRLINE_TOOLS, stream=True)
        received: list[Any] = []
        with pytest.raises(openai.APIError) as caught:
            _drain(stream, received)
        took = time.monotonic() - started
    # The rejected call never reached the client; the failure is reported in the stream, OpenAI-shaped.
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in received)
    error = _openai_error(caught.value)
    print(f"\nenforce stream, retry fault {fault}: SSE error event {error['code']}: {error['message']}")
    assert error["code"] != "internal_error"
    assert [feedback_in(b) is not None for b in model.bodies()] == [False, True]
    assert took < 5
    _no_errors_logged(caplog)
