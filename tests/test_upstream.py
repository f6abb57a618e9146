"""The upstream client against a real (scripted) model server: an injected session, and the upstream time of a
call counted once, when its reply is closed."""

from __future__ import annotations

import aiohttp
import orjson

from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace
from proxy.upstream.chunks import upstream_frames
from proxy.upstream.client import Upstream
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import serve_in_thread

CHAT = {"model": "openai:text", "messages": [{"role": "user", "content": "Hi"}]}


async def test_an_injected_session_carries_the_calls_and_stays_open() -> None:
    scripted = ScriptedUpstream()
    with serve_in_thread(scripted.app) as url:
        async with aiohttp.ClientSession(headers={"x-session-under-test": "injected"}) as session:
            upstream = Upstream(ProxySettings(upstream_url=url + "/v1"), ProxyMetrics(), session=session)
            trace = Trace("req-1")
            payload = await upstream.request_json(
                "POST", "/chat/completions", upstream.headers(None, "req-1"), trace, orjson.dumps(CHAT)
            )
            await upstream.aclose()
            assert not session.closed  # the test's session: its owner closes it
            assert isinstance(payload, dict)
            assert payload["object"] == "chat.completion"
            assert scripted.last.headers["x-session-under-test"] == "injected"
            assert trace.upstream_s > 0


async def test_a_reply_counts_its_upstream_time_once() -> None:
    with serve_in_thread(ScriptedUpstream().app) as url:
        upstream = Upstream(ProxySettings(upstream_url=url + "/v1"), ProxyMetrics())
        try:
            trace = Trace("req-2")
            body = orjson.dumps({**CHAT, "stream": True})
            reply = await upstream.open("POST", "/chat/completions", upstream.headers(None, "req-2"), trace, body)
            assert trace.upstream_s == 0.0  # counted at the close, not before
            frames = [payload async for payload, _ in upstream_frames(reply)]
            assert frames
            reply.close()
            counted = trace.upstream_s
            assert counted > 0
            reply.close()
            assert trace.upstream_s == counted
        finally:
            await upstream.aclose()
