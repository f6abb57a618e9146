"""A client that goes away cancels the upstream request, over real sockets on both sides."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx2
import pytest

from tests.proxy_harness import MESSAGES, running_proxy
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import serve_in_thread


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    scripted = ScriptedUpstream()
    with serve_in_thread(scripted.app) as url:
        yield scripted, url + "/v1"


def test_dropping_a_stream_cancels_the_upstream_within_a_second(upstream: tuple[ScriptedUpstream, str]) -> None:
    scripted, url = upstream
    body = {"model": "openai:slow", "messages": MESSAGES, "stream": True}
    with running_proxy(url) as proxy:
        with httpx2.Client() as client, client.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert received  # the stream was flowing
            assert not scripted.cancelled.is_set()
            dropped_at = time.monotonic()
        # leaving the block closes the connection mid-body
        assert scripted.cancelled.wait(1.0), "upstream never saw the cancel"
        assert scripted.cancelled_at is not None
        assert scripted.cancelled_at - dropped_at < 1.0
        deadline = time.monotonic() + 2
        while "fama_active_streams 0.0" not in httpx2.get(proxy + "/metrics").text:
            assert time.monotonic() < deadline, "the stream was not accounted as finished"
            time.sleep(0.05)


def test_dropping_a_waiting_request_cancels_the_upstream(upstream: tuple[ScriptedUpstream, str]) -> None:
    scripted, url = upstream
    payload = json.dumps({"model": "openai:hang", "messages": MESSAGES}).encode()
    with running_proxy(url) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            deadline = time.monotonic() + 5
            while not scripted.requests:  # the proxy has forwarded it
                assert time.monotonic() < deadline
                time.sleep(0.01)
            dropped_at = time.monotonic()
        assert scripted.cancelled.wait(1.0), "upstream never saw the cancel"
        assert scripted.cancelled_at is not None
        assert scripted.cancelled_at - dropped_at < 1.0
