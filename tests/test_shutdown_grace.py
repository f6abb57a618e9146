"""Open streams on shutdown: ``fama serve`` (a real process) gives them ``sse_shutdown_grace_s``, then cuts them."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx2
import pytest
from pydantic import ValidationError

from proxy.settings import ProxySettings
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import free_port, serve_in_thread, start_fama_serve, wait_for_port

GRACE_S = 1.5
GRACEFUL_SHUTDOWN_S = 15.0


def test_grace_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAMA_SSE_SHUTDOWN_GRACE_S", "7.5")
    assert ProxySettings().sse_shutdown_grace_s == 7.5
    assert ProxySettings().sse_shutdown_grace_s < ProxySettings().graceful_shutdown_s


@pytest.mark.parametrize(("grace", "graceful"), [(25.0, 25.0), (30.0, 25.0), (5.0, 4.0)])
def test_grace_must_stay_below_the_graceful_shutdown(grace: float, graceful: float) -> None:
    with pytest.raises(ValidationError, match="FAMA_SSE_SHUTDOWN_GRACE_S"):
        ProxySettings(sse_shutdown_grace_s=grace, graceful_shutdown_s=graceful)


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValidationError):
        ProxySettings(sse_shutdown_grace_s=-1)


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    # The "slow" scenario streams one chunk every 50 ms for 20 s: longer than the whole shutdown.
    scripted = ScriptedUpstream(slow_delay_s=0.05)
    with serve_in_thread(scripted.app) as url:
        yield scripted, url


def _start_proxy(upstream_url: str, port: int) -> subprocess.Popen[bytes]:
    return start_fama_serve(
        f"{upstream_url}/v1",
        port,
        SSE_SHUTDOWN_GRACE_S=str(GRACE_S),
        GRACEFUL_SHUTDOWN_S=str(GRACEFUL_SHUTDOWN_S),
    )


def test_an_open_stream_gets_the_grace_then_ends_before_the_graceful_shutdown(
    upstream: tuple[ScriptedUpstream, str],
) -> None:
    scripted, upstream_url = upstream
    port = free_port()
    proxy = _start_proxy(upstream_url, port)
    received: list[float] = []  # arrival time of each data event
    ended: list[float] = []
    failure: list[BaseException] = []
    started = threading.Event()

    def read_stream() -> None:
        body = {"model": "openai:slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        try:
            with (
                httpx2.Client(timeout=30) as client,
                client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response,
            ):
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        received.append(time.monotonic())
                        if len(received) == 5:
                            started.set()
        except httpx2.HTTPError as exc:  # the cut at the end of the grace: the body ends unfinished
            failure.append(exc)
        finally:
            ended.append(time.monotonic())
            started.set()

    try:
        wait_for_port(port, timeout=30)
        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert started.wait(timeout=20), "the stream did not start"
        assert not ended, f"the stream ended before the shutdown: {failure}"
        sigterm_at = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        reader.join(timeout=GRACEFUL_SHUTDOWN_S + 10)
        assert ended, "the stream was still open after the graceful shutdown"
        # Still streaming during the grace: the shutdown did not cut the stream at once.
        assert any(t > sigterm_at + GRACE_S / 2 for t in received)
        # Ended by the grace, not by uvicorn's graceful-shutdown timeout nor by the upstream finishing (20 s).
        assert ended[0] - sigterm_at < GRACEFUL_SHUTDOWN_S / 2
        assert scripted.cancelled.wait(timeout=5), "the upstream request was not cancelled when the stream was cut"
        assert proxy.wait(timeout=GRACEFUL_SHUTDOWN_S) is not None
    finally:
        if proxy.poll() is None:
            proxy.kill()
        proxy.wait()
        if proxy.stderr is not None:
            proxy.stderr.close()
