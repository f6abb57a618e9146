"""No key, token, password or ``Authorization`` value in any log line, at the most verbose level, error paths included.

``fama serve`` and ``fama detector`` run as processes at ``trace`` (below debug: uvicorn logs every ASGI message
and connection event; the openai SDK, httpx, httpcore and redis-py log at debug) with the access log on, in
enforce mode, over a Redis with a password (and once embedded, without Redis), with two client keys, an admin key,
an upstream key and a judge key. The traffic covers the happy paths (chat, Responses, the ``/v1`` relay) and the
error paths: no key, a wrong key, another tenant's session, admin routes with a client key, a bad body, an upstream
500, an upstream that echoes the key it got into its error, the upstream down, Redis down. Then every line both
processes wrote is searched.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml
from starlette.types import Message, Receive, Scope, Send

from detector_service.contract.redaction import REDACTED
from proxy.bench.processes import Service, fama, free_port, redis_args, service_env, wait_for_port
from proxy.edge.auth import tenant_id
from tests.proxy_harness import MESSAGES, TOOLS
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import serve_in_thread

CLIENT_KEYS = ("sk-client-one-5a1f0e", "sk-client-two-93c7d2")
WRONG_KEY = "sk-not-a-key-b8e4f1"
ADMIN_KEY = "admin-key-3e9d07a2"
WRONG_ADMIN_KEY = "admin-guess-77c1aa"
UPSTREAM_KEY = "sk-upstream-6d2b90"
JUDGE_KEY = "sk-judge-0c4e18"
REDIS_PASSWORD = "redis-pass-f41b7c"
SECRETS = (*CLIENT_KEYS, WRONG_KEY, ADMIN_KEY, WRONG_ADMIN_KEY, UPSTREAM_KEY, JUDGE_KEY, REDIS_PASSWORD)
# An Authorization value that got through: a scheme followed by anything but the redaction mark.
AUTH_VALUE = re.compile(r"(?i)\b(?:bearer|basic)\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]{4,}")

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class EchoingUpstream:
    """The scripted model server; the model ``leak`` answers 401 quoting the ``Authorization`` it received, as
    some servers do."""

    def __init__(self) -> None:
        self.scripted = ScriptedUpstream()
        self.authorizations: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.scripted.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        self.authorizations.add(headers.get(b"authorization", b"").decode())
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if b'"model":"leak"' in body.replace(b" ", b""):
            text = f'{{"error": {{"message": "Incorrect API key provided: {headers.get(b"authorization", b"").decode()}"}}}}'
            await send(
                {"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": text.encode()})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.scripted.app(scope, replay, send)


def _profile(tmp_path: Path, upstream_url: str) -> Path:
    profile = {
        "version": 1,
        "name": "secrets",
        "mode": "enforce",
        "agents": ["Verifier", "Memory"],
        "deadline_ms": 2000,
        # The judge answers prose, not the verdict JSON: its error path is logged too.
        "judge": {
            "enabled": True,
            "base_url": f"{upstream_url}/v1",
            "model": "openai:text",
            "api_key_env": "TEST_JUDGE_KEY",
        },
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


class Run:
    def __init__(self, tmp_path: Path, redis: bool) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.services: list[Service] = []
        self.redis_service: Service | None = None
        self.proxy_port = free_port()

    def start(self, upstream_url: str) -> None:
        env = service_env(FAMA_LOG_LEVEL="trace", FAMA_PROFILE=str(_profile(self.tmp_path, upstream_url)))
        env["TEST_JUDGE_KEY"] = JUDGE_KEY
        proxy_env = {
            **env,
            "FAMA_PORT": str(self.proxy_port),
            "FAMA_MODE": "enforce",
            "FAMA_ACCESS_LOG": "true",
            "FAMA_API_KEYS": ",".join(CLIENT_KEYS),
            "FAMA_ADMIN_KEY": ADMIN_KEY,
            "FAMA_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "FAMA_UPSTREAM_URL": f"{upstream_url}/v1",
        }
        if self.redis:
            port = free_port()
            args = redis_args(port, self.tmp_path, "--requirepass", REDIS_PASSWORD)
            self.redis_service = Service("redis", args, env, self.tmp_path)
            self.services.append(self.redis_service)
            wait_for_port(port)
            url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
            proxy_env["FAMA_REDIS_URL"] = url
            detector_env = {**env, "FAMA_REDIS_URL": url, "FAMA_METRICS_PORT": str(free_port())}
            detector_env["FAMA_METRICS_HOST"] = "127.0.0.1"
            self.services.append(Service("detector", fama("detector"), detector_env, self.tmp_path))
        self.services.append(Service("proxy", fama("serve"), proxy_env, self.tmp_path))
        wait_for_port(self.proxy_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def lines(self) -> dict[str, list[str]]:
        return {s.name: s.log.read_text(errors="replace").splitlines() for s in self.services if s.name != "redis"}


def _sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def _traffic(run: Run, stop_upstream: Any) -> dict[str, int]:
    """Every path worth logging; returns how often each refusal was seen."""
    url, denied = run.url, {"cross_tenant": 0, "bad_key": 0}
    owner, other, wrong = _sdk(url, CLIENT_KEYS[0]), _sdk(url, CLIENT_KEYS[1]), _sdk(url, WRONG_KEY)
    session = {"x-fama-session": "secret-session"}
    owner.chat.completions.create(model="openai:text", messages=MESSAGES, tools=TOOLS, extra_headers=session)
    owner.chat.completions.create(model="openai:tool", messages=MESSAGES, tools=TOOLS, extra_headers=session)
    for _ in owner.chat.completions.create(model="openai:tools", messages=MESSAGES, tools=TOOLS, stream=True):
        pass
    owner.chat.completions.create(model="openai:text", messages=MESSAGES)
    owner.responses.create(model="openai:text", input="What is the weather in Paris?")
    # Relayed as is to the upstream (which has no such route): the proxy's upstream key goes with it.
    relayed = httpx2.get(f"{url}/v1/files", headers={"authorization": f"Bearer {CLIENT_KEYS[0]}"}, timeout=10)
    assert relayed.status_code == 404
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="openai:text", messages=MESSAGES)
    denied["bad_key"] += 1
    unauthenticated = httpx2.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=10)
    assert unauthenticated.status_code == 401
    denied["bad_key"] += 1
    # The other tenant: the session is unknown to it, the admin routes are closed to it.
    report = {"outcome": "success"}
    answer = httpx2.post(
        f"{url}/v1/fama/sessions/secret-session/outcome",
        json=report,
        headers={"authorization": f"Bearer {CLIENT_KEYS[1]}"},
        timeout=10,
    )
    assert answer.status_code == 404
    denied["cross_tenant"] += 1
    for path in (f"/admin/sessions/{tenant_id(CLIENT_KEYS[0])}/secret-session", "/admin/interventions"):
        for key in (CLIENT_KEYS[1], WRONG_ADMIN_KEY):
            assert httpx2.get(url + path, headers={"authorization": f"Bearer {key}"}, timeout=10).status_code == 401
            denied["cross_tenant"] += 1
        assert httpx2.get(url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).status_code == 200
    with pytest.raises(openai.BadRequestError):
        other.chat.completions.create(model="openai:text", messages=MESSAGES, extra_body={"tools": "not-a-list"})
    bad = httpx2.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"authorization": f"Bearer {CLIENT_KEYS[1]}", "content-type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400
    with pytest.raises(openai.InternalServerError):
        owner.chat.completions.create(model="openai:error-500", messages=MESSAGES, tools=TOOLS)
    with pytest.raises(openai.AuthenticationError) as leaked:
        owner.chat.completions.create(model="leak", messages=MESSAGES)
    assert UPSTREAM_KEY not in str(leaked.value), "the upstream key reached a client"
    if run.redis_service is not None:
        run.redis_service.stop()
        owner.chat.completions.create(model="openai:tool", messages=MESSAGES, tools=TOOLS, extra_headers=session)
    stop_upstream()
    with pytest.raises((openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError)):
        owner.chat.completions.create(model="openai:text", messages=MESSAGES, tools=TOOLS)
    for client in (owner, other, wrong):
        client.close()
    return denied


@pytest.fixture(params=["redis", "embedded"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Run]:
    run = Run(tmp_path, redis=request.param == "redis")
    try:
        yield run
    finally:
        run.stop()


def test_no_secret_in_any_log_line_of_a_full_run(run: Run) -> None:
    upstream = EchoingUpstream()
    with contextlib.ExitStack() as serving:
        run.start(serving.enter_context(serve_in_thread(upstream)))
        denied = _traffic(run, serving.close)
    run.stop()
    assert f"Bearer {UPSTREAM_KEY}" in upstream.authorizations, "the upstream key was not in play"
    assert denied == {"cross_tenant": 5, "bad_key": 2}

    logs = run.lines()
    leaks = [
        f"{name}: {line}"
        for name, lines in logs.items()
        for line in lines
        if any(secret in line for secret in SECRETS) or AUTH_VALUE.search(line)
    ]
    assert not leaks, "\n".join(leaks[:20])
    scanned = sum(len(lines) for lines in logs.values())
    text = "\n".join(line for lines in logs.values() for line in lines)
    # The run logged at its most verbose, the access log included, and the key the upstream echoed was cleaned.
    assert "ASGI [" in text, text[-3000:]
    assert "/v1/chat/completions HTTP/1.1" in text
    assert f"Incorrect API key provided: Bearer {REDACTED}" in text
    assert scanned > 100
    print(f"{scanned} log lines scanned ({', '.join(f'{k}: {len(v)}' for k, v in logs.items())})")
