"""Session outcomes reported through the proxy: official SDK for the chat turns, httpx2 for the outcome endpoint."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml
from redis.asyncio import Redis

from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import Mode, Profile
from detector_service.engine import Engine
from proxy.app import build_supervisor, create_app
from proxy.edge.auth import tenant_id
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.supervision.recorder import RedisRecorder, SessionEntry
from proxy.supervision.sessions import RedisSessionStore
from proxy.supervision.supervisor import Supervisor
from proxy.supervision.verdicts import EmbeddedVerdicts
from tests.servers import RedisServer, serve_in_thread
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import LOOKED_UP, QUESTION, TOOLS, Proxied, cancels_until_told, recorder_of

KEY, OTHER_KEY = "client-key", "other-client-key"
TENANT = tenant_id(KEY)
INTERVENED, CLEAN = "session-with-retry", "session-without-intervention"


def _model(body: dict[str, Any]) -> dict[str, Any]:
    """Cancels without confirmation in the session that gets corrected; answers plainly in the other one."""
    if any(m["role"] == "user" and m["content"] == "Hello" for m in body["messages"]):
        return {"content": "Hello! How can I help you with your reservation?"}
    return cancels_until_told(body)


class Proxy:
    def __init__(self, url: str, proxied: Proxied, redis_url: str | None = None) -> None:
        self.url = url
        self.proxied = proxied
        self.redis_url = redis_url

    def sdk(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def report(self, session_id: str, body: object, key: str | None = KEY) -> httpx2.Response:
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        content = body if isinstance(body, bytes) else None
        json_body = None if isinstance(body, bytes) else body
        return httpx2.post(
            f"{self.url}/v1/fama/sessions/{session_id}/outcome",
            json=json_body,
            content=content,
            headers=headers,
            timeout=10,
        )

    def metric(self, outcome: str, intervened: str) -> float | None:
        return self.proxied.metrics.registry.get_sample_value(
            "fama_session_outcomes_total", {"outcome": outcome, "intervened": intervened}
        )

    def record(self, session_id: str) -> list[SessionEntry]:
        """The session's record once its outcome is in it (Redis writes are batched in the background)."""
        if self.redis_url is None:
            return asyncio.run(recorder_of(self.proxied).session(TENANT, session_id))
        redis_url = self.redis_url

        async def read() -> list[SessionEntry]:
            # Its own client: the app's belongs to the server's event loop.
            async with Redis.from_url(redis_url) as redis:
                reader = RedisRecorder(redis)
                for _ in range(250):
                    entries = await reader.session(TENANT, session_id)
                    if any(e.kind == "outcome" for e in entries):
                        return entries
                    await asyncio.sleep(0.02)
                raise AssertionError(f"no outcome recorded for {session_id}: {entries}")

        return asyncio.run(read())


def _redis_supervisor(redis_url: str, profile: Profile, metrics: ProxyMetrics) -> Supervisor:
    redis = Redis.from_url(redis_url)
    return Supervisor(
        Mode.ENFORCE,
        ProfileHolder.of(profile),
        EmbeddedVerdicts(Engine(profile), metrics),
        RedisSessionStore(redis, 3600, metrics, timeout_s=1.0),
        metrics,
        RedisRecorder(redis, metrics, session_ttl_s=3600),
        closing=redis,
    )


@pytest.fixture(params=["memory", "redis"])
def proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Proxy]:
    """The proxy in enforce mode in front of the scripted model, with two client keys; in-memory session state and
    records, or both in a real Redis (with detectors in-process so the verdicts need no worker)."""
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({}))
    model = ScriptedModel(_model)
    with serve_in_thread(model.app) as upstream:
        settings = ProxySettings(
            upstream_url=upstream + "/v1", profile=str(path), mode=Mode.ENFORCE, api_keys=[KEY, OTHER_KEY]
        )
        redis_url: str | None = None
        if request.param == "redis":
            redis_url = request.getfixturevalue("redis_url")
            # The supervisor's own metrics stay apart; outcomes are counted on the app's (read by the tests).
            proxied = Proxied(ProxyMetrics(), _redis_supervisor(redis_url, Profile(), ProxyMetrics()))
        else:
            metrics = ProxyMetrics()
            proxied = Proxied(metrics, build_supervisor(settings, metrics))
        with serve_in_thread(create_app(settings, proxied.supervisor, proxied.metrics)) as url:
            yield Proxy(url, proxied, redis_url)


def _run_sessions(proxy: Proxy) -> None:
    with proxy.sdk() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=LOOKED_UP, tools=TOOLS, extra_headers={"x-fama-session": INTERVENED}
        )
        assert raw.headers["x-fama-intervention"] == "retry:DCV"
        assert raw.parse().choices[0].message.content == QUESTION
        clean: list[Any] = [LOOKED_UP[0], {"role": "user", "content": "Hello"}]
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=clean, tools=TOOLS, extra_headers={"x-fama-session": CLEAN}
        )
        assert "x-fama-intervention" not in raw.headers
        assert raw.headers["x-fama-session"] == CLEAN


def test_outcomes_are_counted_by_whether_the_session_had_an_intervention(proxy: Proxy) -> None:
    _run_sessions(proxy)
    assert not proxy.metric("success", "yes")

    answer = proxy.report(INTERVENED, {"outcome": "success", "reward": 1, "note": "cancelled after confirming"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "object": "fama.session.outcome",
        "session_id": INTERVENED,
        "outcome": "success",
        "reward": 1.0,
        "intervened": True,
    }
    answer = proxy.report(CLEAN, {"outcome": "failure"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["intervened"] is False

    assert proxy.metric("success", "yes") == 1
    assert proxy.metric("failure", "no") == 1
    assert not proxy.metric("success", "no")
    assert not proxy.metric("failure", "yes")


def test_the_outcome_is_recorded_in_the_session_record(proxy: Proxy) -> None:
    _run_sessions(proxy)
    assert proxy.report(INTERVENED, {"outcome": "success", "reward": 0.5, "note": "ok"}).status_code == 200
    entries = proxy.record(INTERVENED)
    kinds = [e.kind for e in entries]
    assert "intervention" in kinds
    assert kinds[-1] == "outcome"
    assert entries[-1].data == {"outcome": "success", "reward": 0.5, "note": "ok", "intervened": True}
    assert proxy.report(CLEAN, {"outcome": "failure"}).status_code == 200
    assert proxy.record(CLEAN)[-1].data == {"outcome": "failure", "intervened": False}


def test_a_second_report_is_refused_and_not_counted(proxy: Proxy) -> None:
    _run_sessions(proxy)
    assert proxy.report(CLEAN, {"outcome": "success"}).status_code == 200
    again = proxy.report(CLEAN, {"outcome": "failure"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "outcome_already_reported"
    assert proxy.metric("success", "no") == 1
    assert not proxy.metric("failure", "no")


def test_concurrent_reports_count_once(proxy: Proxy) -> None:
    _run_sessions(proxy)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: proxy.report(CLEAN, {"outcome": "success"}), range(8)))
    assert sorted(a.status_code for a in answers) == [200] + [409] * 7
    assert proxy.metric("success", "no") == 1


def test_a_turn_after_the_report_does_not_reopen_it(proxy: Proxy) -> None:
    # The session goes on after its outcome was reported: the turn rewrites the session state, the outcome stays.
    _run_sessions(proxy)
    assert proxy.report(CLEAN, {"outcome": "success"}).status_code == 200
    with proxy.sdk() as client:
        clean: list[Any] = [LOOKED_UP[0], {"role": "user", "content": "Hello"}]
        client.chat.completions.create(model="m", messages=clean, tools=TOOLS, extra_headers={"x-fama-session": CLEAN})
    assert proxy.report(CLEAN, {"outcome": "failure"}).status_code == 409
    assert proxy.metric("success", "no") == 1
    assert not proxy.metric("failure", "no")


def test_unknown_sessions_are_404_also_across_tenants(proxy: Proxy) -> None:
    _run_sessions(proxy)
    missing = proxy.report("never-seen", {"outcome": "success"})
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "No session 'never-seen' is known to this proxy",
        "type": "invalid_request_error",
        "param": "session_id",
        "code": "unknown_session",
    }
    # Sessions are namespaced by tenant: another client key cannot report on this one.
    assert proxy.report(CLEAN, {"outcome": "success"}, key=OTHER_KEY).status_code == 404
    assert not proxy.metric("success", "no")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({}, "outcome"),
        ({"outcome": "maybe"}, "outcome"),
        ({"outcome": "success", "reward": "high"}, "reward"),
        ({"outcome": "success", "reward": True}, "reward"),
        ({"outcome": "success", "note": 5}, "note"),
        ({"outcome": "success", "note": "x" * 2001}, "note"),
        ({"outcome": "success", "score": 1}, "score"),
    ],
)
def test_a_bad_body_is_400_naming_the_field(proxy: Proxy, body: object, param: str | None) -> None:
    _run_sessions(proxy)
    answer = proxy.report(CLEAN, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert proxy.report(CLEAN, {"outcome": "success"}).status_code == 200  # nothing was kept from the bad one


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_reporting_needs_a_client_key(proxy: Proxy, key: str | None) -> None:
    _run_sessions(proxy)
    answer = proxy.report(CLEAN, {"outcome": "success"}, key=key)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert not proxy.metric("success", "no")


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_an_unreachable_session_store_is_503_not_404(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({}))
    redis_server = RedisServer()
    try:
        with serve_in_thread(ScriptedModel(_model).app) as upstream:
            settings = ProxySettings(
                upstream_url=upstream + "/v1", profile=str(path), mode=Mode.ENFORCE, api_keys=[KEY]
            )
            proxied = Proxied(ProxyMetrics(), _redis_supervisor(redis_server.url, Profile(), ProxyMetrics()))
            with serve_in_thread(create_app(settings, proxied.supervisor, proxied.metrics)) as url:
                proxy = Proxy(url, proxied, redis_server.url)
                _run_sessions(proxy)
                redis_server.stop()
                answer = proxy.report(CLEAN, {"outcome": "success"})
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] == "session_store_unavailable"
                assert not proxy.metric("success", "no")
    finally:
        redis_server.stop()
