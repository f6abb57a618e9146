"""``/metrics`` where the operator wants it: on the API port by default, on ``FAMA_METRICS_PORT`` alone when set
(also with several worker processes, which all serve it)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest
from pydantic import ValidationError

from proxy.bench.processes import Service, fama, free_port, service_env, wait_for_port
from proxy.settings import ProxySettings
from tests.proxy_harness import MESSAGES, running_proxy, sdk
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import serve_in_thread


def test_by_default_metrics_are_on_the_api_port() -> None:
    upstream = ScriptedUpstream()
    with serve_in_thread(upstream.app) as upstream_url, running_proxy(upstream_url + "/v1") as url:
        answer = httpx2.get(url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert "fama_requests_total" in answer.text


def test_a_metrics_port_takes_metrics_off_the_api_port() -> None:
    upstream = ScriptedUpstream()
    port = free_port()
    with serve_in_thread(upstream.app) as upstream_url, running_proxy(upstream_url + "/v1", metrics_port=port) as url:
        with sdk(url) as client:
            client.chat.completions.create(model="openai:text", messages=MESSAGES)
        on_api_port = httpx2.get(url + "/metrics", timeout=10)
        on_metrics_port = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        chat_on_metrics_port = httpx2.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
    assert on_api_port.status_code == 404
    assert on_api_port.json()["error"]["code"] == "unknown_url"
    assert on_metrics_port.status_code == 200
    assert (
        'fama_requests_total{model="openai:text",route="/v1/chat/completions",status="200"} 1.0' in on_metrics_port.text
    )
    assert chat_on_metrics_port.status_code == 404  # the API is not served there either


def test_the_metrics_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(ValidationError, match="metrics_port"):
        ProxySettings(port=9000, metrics_port=9000)
    assert ProxySettings.model_validate({"metrics_port": ""}).metrics_port is None


def test_every_worker_process_serves_the_metrics_port(tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    port, metrics_port = free_port(), free_port()
    with serve_in_thread(upstream.app) as upstream_url:
        env = service_env(
            FAMA_UPSTREAM_URL=upstream_url + "/v1", FAMA_PORT=str(port), FAMA_METRICS_PORT=str(metrics_port)
        )
        proxy = Service("proxy", fama("serve", "--workers", "2"), env, tmp_path)
        try:
            wait_for_port(port)
            wait_for_port(metrics_port)
            # Both workers started, the metrics server included (its bind is part of each one's startup).
            deadline = time.monotonic() + 30
            while proxy.output().count("Application startup complete") < 2 and time.monotonic() < deadline:
                proxy.check_alive()
                time.sleep(0.1)
            assert proxy.output().count("Application startup complete") == 2, proxy.output()
            for _ in range(10):
                assert httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).status_code == 200
            assert httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
            proxy.check_alive()
        finally:
            proxy.stop()
        assert "startup failed" not in proxy.output().lower()
