"""A client that goes away cancels the upstream request, over real sockets on both sides."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.proxy_harness import MESSAGES, TOOLS, running_proxy
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import free_port, serve_in_thread, start_fama_serve, stop_process, wait_for_port


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    scripted = ScriptedUpstream()
    with serve_in_thread(scripted.app) as url:
        yield scripted, url + "/v1"


@pytest.mark.parametrize(
    ("settings", "extra"),
    [({}, {}), ({"mode": "enforce"}, {"tools": TOOLS})],
    ids=["pass-through", "supervised"],
)
def test_dropping_a_stream_cancels_the_upstream_within_a_second(
    upstream: tuple[ScriptedUpstream, str], settings: dict[str, Any], extra: dict[str, Any]
) -> None:
    scripted, url = upstream
    body = {"model": "openai:slow", "messages": MESSAGES, "stream": True, **extra}
    with running_proxy(url, **settings) as proxy:
        with httpx2.Client() as client, client.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert received  # the stream was flowing
            assert not scripted.cancelled.is_set()
            dropped_at = time.monotonic()
        # leaving the block closes the connection mid-body
        assert scripted.cancelled.wait(1.0), "upstream never saw the cancel"
        assert scripted.cancelled_at is not None
        print(f"\nclient dropped the stream: upstream cancelled {scripted.cancelled_at - dropped_at:.3f} s later")
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the proxy's RSS from /proc")
def test_a_client_that_stops_reading_holds_back_the_upstream_not_the_proxys_memory() -> None:
    """Backpressure end to end: the client stops reading a 50 MiB stream; the proxy stops reading the upstream
    (its send waits for the socket to drain), so the upstream stalls and the proxy's memory stays flat."""
    scripted = ScriptedUpstream(large_chunks=50_000)
    port = free_port()
    with serve_in_thread(scripted.app) as upstream_url:
        proxy = start_fama_serve(upstream_url + "/v1", port)
        try:
            wait_for_port(port, timeout=30)
            base = f"http://127.0.0.1:{port}"
            warm = {"model": "openai:text", "messages": MESSAGES, "stream": True}
            assert "[DONE]" in httpx2.post(base + "/v1/chat/completions", json=warm).text
            rss_before = _rss_mb(proxy.pid)
            payload = json.dumps({"model": "openai:large", "messages": MESSAGES, "stream": True}).encode()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.connect(("127.0.0.1", port))
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                read = b""
                while len(read) < 64 * 1024:
                    read += sock.recv(65536)
                assert read.startswith(b"HTTP/1.1 200")
                # The client reads nothing more for 3 s.
                samples = []
                for _ in range(12):
                    time.sleep(0.25)
                    samples.append((scripted.produced, _rss_mb(proxy.pid)))
                stalled_at = scripted.produced
                peak = max(rss for _, rss in samples)
                # Then it reads the rest: the stream resumes and ends normally.
                sock.settimeout(30)
                tail = b""
                while not tail.endswith(b"data: [DONE]\r\n\r\n") and (piece := sock.recv(1 << 20)):
                    tail = (tail + piece)[-64:]
            print(
                f"\nslow reader: upstream stalled after {stalled_at} of 50000 1-KiB chunks; proxy RSS "
                f"{rss_before:.1f} MiB before, peak {peak:.1f} MiB while the client did not read"
            )
            assert samples[-1][0] == samples[-5][0], "the upstream kept producing while the client did not read"
            assert stalled_at < 50_000  # what is in flight sits in socket buffers (the kernel's), not in the proxy
            assert peak - rss_before < 20
            assert scripted.produced == 50_000
        finally:
            stop_process(proxy, timeout=10)
            if proxy.stderr is not None:
                proxy.stderr.close()
