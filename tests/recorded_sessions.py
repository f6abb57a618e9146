"""Sessions recorded by a real proxy for the export, report and README tests: a scripted airline model, the proxy on
uvicorn with its records in a real redis-server (detectors in-process) or in memory, the official SDK as the client."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import yaml
from redis.asyncio import Redis

from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import Mode, Profile
from detector_service.engine import Engine
from proxy.app import build_supervisor, create_app
from proxy.edge.auth import tenant_id
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.supervision.recorder import RedisRecorder
from proxy.supervision.sessions import RedisSessionStore
from proxy.supervision.supervisor import Supervisor
from proxy.supervision.verdicts import EmbeddedVerdicts
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel, call
from tests.supervision_harness import CANCEL, LOOKED_UP, TOOLS

KEY, OTHER_KEY, ADMIN = "client-key-1", "client-key-2", "admin-key-123"
TENANT, OTHER_TENANT = tenant_id(KEY), tenant_id(OTHER_KEY)
HELLO = "Hello! How can I help you with your reservation?"
SECRET = "sk-live-0123456789abcdef"
LEAKY = f"My old booking tool wants api_key={SECRET}, can you cancel ZFA04Y?"
LOOKUP = call("get_reservation_details", '{"reservation_id": "ZFA04Y"}', "call_0")


def airline_model(body: dict[str, Any]) -> dict[str, Any]:
    """Greets back a greeting; otherwise looks the reservation up, then cancels it (without any confirmation)."""
    user = [m for m in body["messages"] if m["role"] == "user"]
    if user and user[-1]["content"] == "Hello":
        return {"content": HELLO}
    if any(m["role"] == "tool" for m in body["messages"]):
        return {"tool_calls": [CANCEL]}
    return {"tool_calls": [LOOKUP]}


@dataclass
class Proxy:
    url: str
    redis_url: str | None

    def sdk(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def turn(self, session: str, messages: list[Any], key: str = KEY) -> dict[str, Any]:
        with self.sdk(key) as client:
            answer = client.chat.completions.create(
                model="m", messages=messages, tools=TOOLS, extra_headers={"x-fama-session": session}
            )
        return answer.choices[0].message.model_dump(exclude_none=True)

    def report(self, session: str, body: dict[str, Any], key: str = KEY) -> None:
        answer = httpx2.post(
            f"{self.url}/v1/fama/sessions/{session}/outcome",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text


def _supervisor(mode: Mode, redis_url: str | None, settings: ProxySettings, metrics: ProxyMetrics) -> Supervisor:
    if redis_url is None:
        return build_supervisor(settings, metrics)
    # Detectors in-process, records and session state in Redis: the export reads what this recorder wrote.
    redis = Redis.from_url(redis_url)
    return Supervisor(
        mode,
        ProfileHolder.of(Profile()),
        EmbeddedVerdicts(Engine(Profile()), metrics),
        RedisSessionStore(redis, 3600, metrics, timeout_s=1.0),
        metrics,
        RedisRecorder(redis, metrics, session_ttl_s=3600),
        closing=redis,
    )


@contextlib.contextmanager
def running(tmp_path: Path, mode: Mode, redis_url: str | None) -> Iterator[Proxy]:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({}))
    with serve_in_thread(ScriptedModel(airline_model).app) as upstream:
        settings = ProxySettings(
            upstream_url=upstream + "/v1", profile=str(path), mode=mode, api_keys=[KEY, OTHER_KEY], admin_key=ADMIN
        )
        metrics = ProxyMetrics()
        with serve_in_thread(create_app(settings, _supervisor(mode, redis_url, settings, metrics), metrics)) as url:
            yield Proxy(url, redis_url)


FAILED, FALSE_ALARMS, GOOD = 8, 2, 14
GREETING: list[Any] = [LOOKED_UP[0], {"role": "user", "content": "Hello"}]


def record_outcomes(proxy: Proxy) -> None:
    """``FAILED`` unconfirmed cancellations that failed, ``FALSE_ALARMS`` that went well anyway, ``GOOD`` greetings
    that went well: enough sessions with outcomes for ``fama analyze``."""
    for n in range(FAILED + FALSE_ALARMS):
        proxy.turn(f"cancel-{n}", LOOKED_UP)
        proxy.report(f"cancel-{n}", {"outcome": "failure" if n < FAILED else "success"})
    for n in range(GOOD):
        proxy.turn(f"hello-{n}", GREETING)
        proxy.report(f"hello-{n}", {"outcome": "success"})


def message_shape(message: dict[str, Any]) -> tuple[Any, ...]:
    """What a message says, whichever side wrote it (the SDK leaves out what the upstream sent as null)."""
    calls = tuple(
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or ()
    )
    return message["role"], message.get("content") or None, calls, message.get("tool_call_id")
