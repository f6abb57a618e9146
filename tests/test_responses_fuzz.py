"""Whatever JSON a client sends to ``/v1/responses``, the bridged proxy answers a Response, a spec-valid event
stream, or an OpenAI-shaped 4xx; never a 5xx of its own. Hypothesis generates Responses-shaped bodies, mostly well
typed, against a real proxy in enforce mode in front of a scripted chat-only model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import json_values
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import TOOLS, proxy_for
from tests.test_proxy_fuzz import ARGS, NAMES, TEXTS, _reply


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return json_values.mostly(valid, 10)


text = st.sampled_from(TEXTS)
part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": text})
item = st.one_of(
    st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["user", "assistant", "system", "developer", "bogus"]))},
        optional={"type": st.just("message"), "content": mostly(text | st.lists(part, max_size=2))},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": mostly(st.sampled_from(["c1", "c2"])),
            "name": mostly(st.sampled_from(NAMES)),
            "arguments": mostly(st.sampled_from(ARGS)),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": mostly(st.just("c1")), "output": mostly(text)}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "item_reference", "web_search_call"])}),
)
flat_tools = [{"type": "function", **t["function"]} for t in TOOLS]
tool = st.sampled_from(flat_tools) | st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "web_search"]), "name": mostly(st.sampled_from(NAMES))}
)
body = st.fixed_dictionaries(
    {"model": mostly(st.just("m")), "input": mostly(text | st.lists(item, max_size=5))},
    optional={
        "instructions": mostly(text),
        "tools": mostly(st.lists(tool, max_size=3)),
        "tool_choice": mostly(
            st.sampled_from(["auto", "none", "required", {"type": "function", "name": "cancel_reservation"}])
        ),
        "stream": mostly(st.booleans()),
        "text": mostly(st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}}])),
        "max_output_tokens": mostly(st.integers(1, 100)),
        "previous_response_id": mostly(st.just("resp_unknown")),
    },
)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = {"version": 1, "agents": ["DCE", "TSA", "TOR", "Planner", "Verifier", "Memory"]}
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with proxy_for(ScriptedModel(_reply), tmp, mode="enforce", profile=profile) as (client, _app):
        yield str(client.base_url)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(request=body)
def test_no_body_makes_the_proxy_fail(proxy: str, request: dict[str, Any]) -> None:
    response = httpx2.post(proxy + "responses", json=request, timeout=30)
    param = response.json()["error"]["param"] if 400 <= response.status_code < 500 else ""
    event(f"status {response.status_code} {param}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        assert error["type"] == "invalid_request_error"
    elif request.get("stream") is True:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
    else:
        assert response.json()["object"] == "response"
