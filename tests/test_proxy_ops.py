"""Health, readiness, metrics and tenant identity of the proxy."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest

from proxy.app import create_app
from proxy.hooks import ChatContext, ChatHooks
from proxy.settings import ProxySettings
from tests.proxy_harness import MESSAGES, sdk
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import refused_url, serve_in_thread


class TenantProbe(ChatHooks[None]):
    """Pass-through hooks that remember which tenant each turn ran for."""

    def __init__(self) -> None:
        self.tenants: list[str] = []

    async def before_upstream(self, ctx: ChatContext[None], body: dict[str, Any]) -> dict[str, Any]:
        self.tenants.append(ctx.tenant)
        return body


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve_in_thread(ScriptedUpstream().app) as url:
        yield url + "/v1"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def test_health_readiness_and_request_metrics(upstream_url: str) -> None:
    with serve_in_thread(create_app(ProxySettings(upstream_url=upstream_url))) as proxy, sdk(proxy) as client:
        assert httpx2.get(proxy + "/healthz").json() == {"status": "ok"}
        assert httpx2.get(proxy + "/readyz").status_code == 200
        client.chat.completions.create(model="openai:text", messages=MESSAGES)
        list(client.chat.completions.create(model="openai:text", messages=MESSAGES, stream=True))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="openai:error-429", messages=MESSAGES)
        text = httpx2.get(proxy + "/metrics").text
    route = "/v1/chat/completions"
    assert metric(text, "fama_requests_total", route=route, status="200", model="openai:text") == 2
    assert metric(text, "fama_requests_total", route=route, status="429", model="") == 1
    assert metric(text, "fama_request_duration_seconds_count", route=route) == 3
    assert metric(text, "fama_upstream_duration_seconds_count", route=route) == 3
    assert metric(text, "fama_proxy_overhead_seconds_count", route=route) == 3
    assert metric(text, "fama_time_to_first_token_seconds_count", model="openai:text") == 1
    assert metric(text, "fama_upstream_errors_total", kind="status_4xx") == 1
    assert metric(text, "fama_active_streams") == 0


def test_connect_errors_are_counted() -> None:
    with refused_url() as upstream:
        settings = ProxySettings(upstream_url=upstream)
        with serve_in_thread(create_app(settings)) as proxy, sdk(proxy) as client:
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="openai:text", messages=MESSAGES)
            text = httpx2.get(proxy + "/metrics").text
    assert metric(text, "fama_upstream_errors_total", kind="connect") == 1


def test_tenant_is_a_key_digest_and_default_without_auth(upstream_url: str) -> None:
    probe = TenantProbe()
    settings = ProxySettings(upstream_url=upstream_url, api_keys="key-alpha-1,key-beta-2")
    with serve_in_thread(create_app(settings, hooks=probe)) as proxy:
        for key in ("key-alpha-1", "key-beta-2"):
            with sdk(proxy, api_key=key) as client:
                client.chat.completions.create(model="openai:text", messages=MESSAGES)
    expected = ["t-" + hashlib.sha256(k.encode()).hexdigest()[:16] for k in ("key-alpha-1", "key-beta-2")]
    assert probe.tenants == expected
    open_probe = TenantProbe()
    app = create_app(ProxySettings(upstream_url=upstream_url), hooks=open_probe)
    with serve_in_thread(app) as proxy, sdk(proxy, api_key="anything") as client:
        client.chat.completions.create(model="openai:text", messages=MESSAGES)
    assert open_probe.tenants == ["default"]


class BrokenStreamHooks(ChatHooks[None]):
    """Hooks with a bug: the stream breaks after its first chunk."""

    def stream(self, ctx: ChatContext[None], chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async def broken() -> AsyncIterator[dict[str, Any]]:
            async for chunk in chunks:
                yield chunk
                raise RuntimeError("a bug in a hook")

        return broken()


def test_a_failure_inside_the_proxy_mid_stream_reaches_the_sdk_as_an_error(
    upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(ProxySettings(upstream_url=upstream_url), hooks=BrokenStreamHooks())
    with serve_in_thread(app) as proxy, sdk(proxy) as client:
        stream = client.chat.completions.create(model="openai:text", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            list(stream)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "internal_error"
    assert "stream failed inside the proxy" in caplog.text
