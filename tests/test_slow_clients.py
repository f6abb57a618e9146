"""Slow and greedy clients against ``fama serve`` (a real process): trickled headers and bodies are closed by the
read deadline without slowing anyone else, idle connections by the keep-alive timeout, and one address cannot
hold more than its share of connections."""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import pytest

from tests.proxy_harness import MESSAGES
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import free_port, serve_in_thread, start_fama_serve, stop_process, wait_for_port
from tests.slow_clients import slow_clients

READ_TIMEOUT_S = 3.0
KEEP_ALIVE_S = 2
PER_CLIENT = 60
SLOW_SOURCES = [f"127.0.0.{i}" for i in range(2, 7)]  # 5 addresses x 60 connections = 300, each at the cap


@dataclass
class Proxy:
    url: str
    port: int


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    with serve_in_thread(ScriptedUpstream().app) as upstream_url:
        port = free_port()
        process = start_fama_serve(
            upstream_url + "/v1",
            port,
            REQUEST_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
            KEEP_ALIVE_TIMEOUT_S=str(KEEP_ALIVE_S),
            MAX_CONNECTIONS_PER_CLIENT=str(PER_CLIENT),
        )
        try:
            wait_for_port(port, timeout=30)
            yield Proxy(f"http://127.0.0.1:{port}", port)
        finally:
            stop_process(process, timeout=10)
            if process.stderr is not None:
                process.stderr.close()


def _latencies(client: httpx2.Client, url: str, n: int) -> list[float]:
    body = {"model": "openai:text", "messages": MESSAGES}
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(url + "/v1/chat/completions", json=body)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def _closures(proxy: Proxy, reason: str) -> float:
    for line in httpx2.get(proxy.url + "/metrics").text.splitlines():
        if line.startswith(f'fama_client_closures_total{{reason="{reason}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no fama_client_closures_total series for {reason}")


def test_300_slow_connections_are_closed_by_the_deadline_and_do_not_slow_normal_requests(proxy: Proxy) -> None:
    closed_before = _closures(proxy, "read_deadline")
    with httpx2.Client(timeout=10) as client:
        _latencies(client, proxy.url, 20)  # warm up the connections on both sides
        quiet = _latencies(client, proxy.url, 150)
        with slow_clients(proxy.port, 300, SLOW_SOURCES, interval_s=0.5) as slow:
            time.sleep(0.5)  # every slow connection is open and trickling
            assert len(slow.held()) == 300
            loaded = _latencies(client, proxy.url, 150)
            slow.wait_closed(READ_TIMEOUT_S + 10)
            held = slow.held()
            lifetimes = [c.closed_at - c.first_byte_at for c in slow.connections if c.closed_at is not None]
            answered = [c.status for c in slow.connections]
        after = _latencies(client, proxy.url, 20)
    print(
        f"\nnormal requests p50/p99: quiet {_p(quiet, 50):.2f}/{_p(quiet, 99):.2f} ms, under 300 slow connections "
        f"{_p(loaded, 50):.2f}/{_p(loaded, 99):.2f} ms; slow connections closed after "
        f"{min(lifetimes):.2f}-{max(lifetimes):.2f} s (deadline {READ_TIMEOUT_S} s), held {len(held)}, "
        f"answered 408: {answered.count(408)}"
    )
    assert held == []
    # Closed by the deadline, counted from each request's first byte, not before and not long after.
    assert min(lifetimes) >= READ_TIMEOUT_S - 0.1
    assert max(lifetimes) <= READ_TIMEOUT_S + 3.0
    assert set(answered) <= {408, None}  # 408 when the answer was read before the close, never anything else
    assert answered.count(408) >= 150
    # Normal requests barely notice (generous bounds: a shared 2-core machine).
    assert _p(loaded, 50) <= 3 * _p(quiet, 50) + 5
    assert _p(loaded, 99) <= 3 * _p(quiet, 99) + 50
    assert len(after) == 20
    assert _closures(proxy, "read_deadline") - closed_before == 300


def test_one_address_holds_at_most_its_cap_of_connections(proxy: Proxy) -> None:
    with slow_clients(proxy.port, PER_CLIENT + 40, ["127.0.0.9"], interval_s=0.5) as slow:
        time.sleep(1.0)
        closed_at_once = [c for c in slow.connections if c.closed_at is not None]
        assert len(slow.held()) == PER_CLIENT
        assert len(closed_at_once) == 40
        assert _closures(proxy, "per_client_cap") >= 40
        assert all(c.closed_at - c.first_byte_at < 1.0 for c in closed_at_once)  # type: ignore[operator]
        # Other addresses are not affected by this one's cap.
        ok = httpx2.post(proxy.url + "/v1/chat/completions", json={"model": "openai:text", "messages": MESSAGES})
        assert ok.status_code == 200
        slow.wait_closed(READ_TIMEOUT_S + 10)
        assert slow.held() == []
    # The address's count is released: a new connection from it is served.
    with httpx2.Client(transport=httpx2.HTTPTransport(local_address="127.0.0.9")) as client:
        assert client.get(proxy.url + "/healthz").status_code == 200


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as idle:
        idle.settimeout(KEEP_ALIVE_S + 5)
        opened = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server without a byte sent either way
        waited = time.monotonic() - opened
    assert KEEP_ALIVE_S - 0.2 <= waited <= KEEP_ALIVE_S + 2


def test_oversized_headers_are_431_in_openai_shape(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
        conn.settimeout(10)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (70 * 1024))  # the cap is 64 KiB
        answer = b""
        while piece := conn.recv(65536):
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")
    assert json.loads(body)["error"]["code"] == "headers_too_large"


def test_upgrade_requests_are_plain_http_and_release_their_connection(proxy: Proxy) -> None:
    # A WebSocket upgrade would hand the connection to a protocol outside the limits (and never release its
    # count): more upgrade requests from one address than its cap, then a normal request from it.
    upgrade = (
        b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for _ in range(PER_CLIENT + 5):
        with socket.socket() as sock:
            sock.bind(("127.0.0.10", 0))
            sock.connect(("127.0.0.1", proxy.port))
            sock.settimeout(5)
            sock.sendall(upgrade)
            assert not sock.recv(64).startswith(b"HTTP/1.1 101")
    with httpx2.Client(transport=httpx2.HTTPTransport(local_address="127.0.0.10")) as client:
        assert client.get(proxy.url + "/healthz").status_code == 200
