"""Shared pieces of the supervision tests: a conversation, profiles on disk, the proxy on a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml

from proxy.app import build_supervisor, create_app
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.supervision.recorder import Intervention, Recorder
from proxy.supervision.supervisor import Supervisor
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel, call, feedback_in

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_reservation_details",
            "description": "Get the details of a reservation.",
            "parameters": {
                "type": "object",
                "properties": {"reservation_id": {"type": "string"}},
                "required": ["reservation_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "cancel_reservation",
            "description": "Cancel the whole reservation.",
            "parameters": {
                "type": "object",
                "properties": {"reservation_id": {"type": "string"}},
                "required": ["reservation_id"],
            },
        },
    },
]
SYSTEM = (
    "You are an airline agent. Before any action that changes a booking, list the details and obtain explicit "
    "user confirmation (yes)."
)
RESERVATION = {"reservation_id": "ZFA04Y", "status": "booked", "flights": [{"flight_number": "HAT136", "price": 152}]}
# The reservation was looked up; the user has not confirmed the cancellation.
LOOKED_UP: list[Any] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("get_reservation_details", '{"reservation_id": "ZFA04Y"}', "call_0")],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(RESERVATION)},
]
QUESTION = "Reservation ZFA04Y (flight HAT136) will be cancelled. Do you confirm? (yes/no)"

# The same conversation in the Responses API's input items: a cancellation asked for, the reservation looked up.
RESPONSES_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]
LOOKED_UP_ITEMS: list[Any] = [
    {"role": "user", "content": "Please cancel my reservation ZFA04Y."},
    {
        "type": "function_call",
        "call_id": "call_0",
        "name": "get_reservation_details",
        "arguments": '{"reservation_id": "ZFA04Y"}',
    },
    {"type": "function_call_output", "call_id": "call_0", "output": json.dumps(RESERVATION)},
]
CANCEL = call("cancel_reservation", '{"reservation_id": "ZFA04Y"}')


def cancels_until_told(body: dict[str, Any]) -> dict[str, Any]:
    """Calls the write tool at once; asks for confirmation once the proxy's feedback says so."""
    if feedback_in(body):
        return {"content": QUESTION}
    return {"tool_calls": [CANCEL]}


def always_cancels(body: dict[str, Any]) -> dict[str, Any]:
    return {"tool_calls": [CANCEL]}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="client-key", max_retries=0, timeout=20)


@dataclass
class Proxied:
    """A running proxy's parts the tests read: its metrics and its supervisor."""

    metrics: ProxyMetrics
    supervisor: Supervisor


@contextlib.contextmanager
def proxy_for(model: ScriptedModel, tmp_path: Path, **settings: Any) -> Iterator[tuple[openai.OpenAI, Proxied]]:
    """The scripted model, the proxy in front of it and an SDK client of the proxy.

    ``profile`` (a dict) is written to a YAML file for the proxy to load.
    """
    profile = settings.pop("profile", {})
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    with serve_in_thread(model.app) as upstream:
        proxy_settings = ProxySettings(upstream_url=upstream + "/v1", profile=str(path), **settings)
        metrics = ProxyMetrics()
        supervisor = build_supervisor(proxy_settings, metrics)
        with serve_in_thread(create_app(proxy_settings, supervisor, metrics)) as url, sdk(url) as client:
            yield client, Proxied(metrics, supervisor)


def recorder_of(proxied: Proxied) -> Recorder:
    assert proxied.supervisor.recorder is not None
    return proxied.supervisor.recorder


def interventions(app: Proxied) -> list[Intervention]:
    """What the (in-memory) recorder holds, oldest first."""
    return list(reversed(asyncio.run(recorder_of(app).interventions())))
