"""Responses kept in Redis: any proxy replica answers for a response another one created; a Redis outage does not
lose the answer, and a chained request it cannot serve is a clear 503."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from detector_service.bus.keys import response_key
from proxy.app import create_app
from proxy.settings import ProxySettings
from tests.servers import free_port, serve_in_thread
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import sdk

pytestmark = pytest.mark.redis
TTL_S = 3600


def echo(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": f"heard {len(body['messages'])} messages"}


@contextlib.contextmanager
def replicas(upstream: str, redis_url: str, tmp_path: Path, count: int) -> Iterator[list[openai.OpenAI]]:
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({}))
    settings = ProxySettings(
        upstream_url=upstream + "/v1", redis_url=redis_url, profile=str(profile), session_ttl_s=TTL_S
    )
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(create_app(settings))) for _ in range(count)]
        yield [stack.enter_context(sdk(url)) for url in urls]


def test_a_chain_crosses_replicas(redis_url: str, tmp_path: Path) -> None:
    model = ScriptedModel(echo)
    with serve_in_thread(model.app) as upstream, replicas(upstream, redis_url, tmp_path, 2) as (a, b):
        first = a.responses.create(model="m", input="one")
        second = b.responses.create(model="m", input="two", previous_response_id=first.id)
        assert second.output_text == "heard 3 messages"  # one, the answer to it, two
        assert [m["content"] for m in model.bodies()[-1]["messages"]] == ["one", "heard 1 messages", "two"]
        assert a.responses.retrieve(second.id).output_text == "heard 3 messages"
        [item] = a.responses.input_items.list(second.id).data
        assert item.type == "message"

        store = redis.Redis.from_url(redis_url)
        assert 0 < store.ttl(response_key("default", first.id)) <= TTL_S
        b.responses.delete(first.id)
        assert store.exists(response_key("default", first.id)) == 0
        store.close()
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(first.id)


def test_redis_outage_keeps_answers_and_fails_chained_requests_clearly(tmp_path: Path) -> None:
    model = ScriptedModel(echo)
    down = f"redis://127.0.0.1:{free_port()}/0"
    with serve_in_thread(model.app) as upstream, replicas(upstream, down, tmp_path, 1) as (client,):
        answered = client.responses.create(model="m", input="one")
        assert answered.output_text == "heard 1 messages"
        with pytest.raises(openai.APIStatusError) as unavailable:
            client.responses.create(model="m", input="two", previous_response_id=answered.id)
        assert unavailable.value.status_code == 503
        assert unavailable.value.code == "response_store_unavailable"
