"""Whatever JSON a client sends, the proxy answers with the model's response or an OpenAI-shaped 4xx, never a
5xx of its own. Hypothesis generates chat-shaped bodies, mostly well typed and sometimes not, against a real
proxy in enforce mode (every agent injecting, the detectors judging) in front of a scripted model that
answers with text, real tool calls or calls written as text.
"""

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

NAMES = ["cancel_reservation", "get_reservation_details", "unknown_tool", ""]
ARGS = ['{"reservation_id": "A1B2C3"}', "{bad", "", "{}", "[]", '{"reservation_id": 5}']
TEXTS = ["hi", "yes, go ahead", "no", "Error: not found", "", "Your reservation has been cancelled.", "é😀"]
ROLES = ["user", "assistant", "tool", "system", "developer", "bogus"]


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right type 9 times in 10, any JSON value otherwise: most bodies get past validation."""
    return json_values.mostly(valid, 10)


function = st.fixed_dictionaries({"name": mostly(st.sampled_from(NAMES)), "arguments": mostly(st.sampled_from(ARGS))})
tool_call = st.fixed_dictionaries(
    {"id": mostly(st.sampled_from(["c1", "c2"])), "type": st.just("function"), "function": mostly(function)}
)
content = st.one_of(
    st.sampled_from(TEXTS),
    st.none(),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.sampled_from(TEXTS)}), max_size=2),
)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(ROLES))},
    optional={
        "content": mostly(content),
        "tool_calls": mostly(st.lists(tool_call, max_size=2)),
        "tool_call_id": mostly(st.sampled_from(["c1", "c2", "zz"])),
    },
)
declared = st.sampled_from(TOOLS) | st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": mostly(
            st.fixed_dictionaries(
                {"name": mostly(st.sampled_from(NAMES)), "parameters": mostly(st.just({"type": "object"}))}
            )
        ),
    }
)
body = st.fixed_dictionaries(
    {"model": mostly(st.just("m")), "messages": mostly(st.lists(message, min_size=1, max_size=6))},
    optional={
        "tools": mostly(st.lists(declared, max_size=3)),
        "tool_choice": mostly(st.sampled_from(["auto", "none", "required"])),
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.just({"include_usage": True})),
        "response_format": mostly(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    },
)


def _reply(request: dict[str, Any]) -> dict[str, Any]:
    """Text, a real call, or a call written as text, chosen by the request so that a run is repeatable."""
    kind = len(json.dumps(request["messages"])) % 3
    if kind == 0:
        return {"content": "Sure, one moment."}
    call = {"name": "cancel_reservation", "arguments": '{"reservation_id": "A1B2C3"}'}
    if kind == 1:
        return {"content": None, "tool_calls": [{"id": "t1", "type": "function", "function": call}]}
    return {"content": 'Cancelling now.\n{"name": "cancel_reservation", "arguments": {"reservation_id": "A1B2C3"}}'}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = {"version": 1, "agents": ["DCE", "TSA", "TOR", "Planner", "Verifier", "Memory"]}
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with proxy_for(ScriptedModel(_reply), tmp, mode="enforce", profile=profile) as (client, _app):
        yield str(client.base_url)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(request=body)
def test_no_body_makes_the_proxy_fail(proxy: str, request: dict[str, Any]) -> None:
    response = httpx2.post(proxy + "chat/completions", json=request, timeout=30)
    param = response.json()["error"]["param"] if response.status_code == 400 else ""
    event(f"status {response.status_code} {param}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        assert error["type"] == "invalid_request_error"
    elif request.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["object"] == "chat.completion"
