"""Shared pieces for the proxy tests: a scripted upstream and the proxy, both on real uvicorn servers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
from jsonschema import Draft202012Validator

from proxy.app import create_app
from proxy.server import connection_options
from proxy.settings import ProxySettings
from tests.servers import serve_in_thread

MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather and the time in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    },
]


@contextlib.contextmanager
def running_proxy(upstream_url: str, **settings: Any) -> Iterator[str]:
    """The proxy app on a real uvicorn, with the connection handling of ``fama serve``; yields its base URL
    (without ``/v1``)."""
    config = ProxySettings(upstream_url=upstream_url, **settings)
    with serve_in_thread(create_app(config), **connection_options(config)) as url:
        yield url


def sdk(base_url: str, api_key: str = "client-key", max_retries: int = 0, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url + "/v1",
        api_key=api_key,
        max_retries=max_retries,
        _strict_response_validation=True,
        **kwargs,
    )


def validator(schemas: Path, name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((schemas / f"{name}.json").read_text()))


def schema_errors(schemas: Path, name: str, body: object) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(schemas, name).iter_errors(body)]
